"""One spelling per identifier: patient, exam and site ids as a manifest is read.

Ids are typed by hand and pass through spreadsheets, so one patient turns up as `A0001`
and `A0001 ` (a trailing space), `Ａ0001` (full-width, from a Chinese input method) or
`007` and `7` (a spreadsheet that took the id for a number). Compared as raw text these
are two patients, and a trial can put one half of a patient in train and the other in
test. Ids are therefore compared by a normal form (Unicode NFKC, outer whitespace gone,
inner runs of whitespace one space, leading zeros of an all-digit id dropped), and every
row takes the first spelling of its id in the file, so ids that needed no merging are
kept exactly as written.
"""

from __future__ import annotations

import re
import unicodedata

import pandas as pd

IDENTIFIER_COLUMNS = ("patient_id", "exam_id", "site")
_WHITESPACE = re.compile(r"\s+")
_NOT_ALPHANUMERIC = re.compile(r"[\W_]+")


def identifier_form(text: str) -> str:
    """The form ids are compared by: NFKC, whitespace trimmed and collapsed, and an
    all-digit id without its leading zeros ("007" and "7" are one id)."""
    form = _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()
    if form.isascii() and form.isdigit():
        return form.lstrip("0") or "0"
    return form


def _look_alike(text: str) -> str:
    # Case and punctuation rarely tell two patients apart, but often tell two typists.
    return _NOT_ALPHANUMERIC.sub("", identifier_form(text).casefold())


def unify_identifiers(table: pd.DataFrame, lines: pd.Series) -> list[str]:
    """Give every row of `table` the first spelling of its id in each id column (in place).

    Args:
        table: a manifest table; the columns of IDENTIFIER_COLUMNS it has are rewritten.
        lines: the file line of each row, for the messages.

    Returns:
        One warning per id column where two spellings were merged, naming the first pair
        and their lines, and one when one report is under two patient ids that differ
        only in case or punctuation (ids kept apart, but likely one patient).
    """
    warnings = []
    for column in IDENTIFIER_COLUMNS:
        if column not in table:
            continue
        raw = table[column].astype(str)
        forms = raw.map(identifier_form)
        first_spelling = raw.groupby(forms, sort=False).transform("first")
        merged = raw != first_spelling
        if merged.any():
            row = merged.idxmax()
            first = ((forms == forms[row]) & ~merged).idxmax()
            count = int(merged.sum())
            warnings.append(
                f"column '{column}': {raw[row]!r} (line {lines[row]}) is taken as "
                f"{raw[first]!r} (line {lines[first]})"
                + (f", and {count - 1} more row(s) like it" if count > 1 else "")
                + "; ids are compared without outer spaces, full-width forms and leading "
                "zeros"
            )
        table[column] = first_spelling.str.strip()
    if {"patient_id", "report_text"} <= set(table.columns):
        warnings += _look_alike_patients(table, lines)
    return warnings


def _look_alike_patients(table: pd.DataFrame, lines: pd.Series) -> list[str]:
    counts = table.groupby("report_text", sort=False)["patient_id"].nunique()
    shared = table[table["report_text"].isin(counts.index[counts > 1])]
    for report, patients in shared.groupby("report_text", sort=False)["patient_id"]:
        ids = list(dict.fromkeys(patients))
        alike = pd.Series(ids).map(_look_alike)
        repeated = alike[alike.duplicated(keep=False)]
        if report.strip() and len(repeated):
            first, second = (ids[position] for position in repeated.index[:2])
            line_of = {patient: lines[patients.index[patients == patient][0]] for patient in ids}
            return [
                f"one report is under patients {first!r} (line {line_of[first]}) and "
                f"{second!r} (line {line_of[second]}), which differ only in case or "
                "punctuation: if they are one patient, spell the id one way"
            ]
    return []
