import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.errors import UserError
from pipeline.manifest import image_file, load_manifest

CLASSES = ("VCD", "GC")


def write_manifest(folder: Path, rows: list[dict], images: bool = True) -> Path:
    if images:
        (folder / "images").mkdir(exist_ok=True)
        for row in rows:
            if "image_path" in row:
                # distinct bytes per file: one content under two patients is an error
                (folder / row["image_path"]).write_bytes(row["image_path"].encode())
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def good_rows() -> list[dict]:
    return [
        {
            "image_path": f"images/{i}.png",
            "report_text": f"报告{i // 2}",
            "label": "GC",
            "patient_id": f"00{i // 2}",
        }
        for i in range(4)
    ]


def test_valid_manifest_gets_default_columns(tmp_path):
    table = load_manifest(write_manifest(tmp_path, good_rows()), CLASSES)
    assert list(table["patient_id"]) == ["000", "000", "001", "001"]  # ids stay text
    assert (table["split"] == "").all() and (table["site"] == "").all()
    # one exam per patient and report
    assert table["exam_id"].nunique() == 2
    assert table.loc[0, "exam_id"] == table.loc[1, "exam_id"]


def test_missing_column_names_it(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "label"} for row in good_rows()]
    with pytest.raises(UserError, match=r"missing column\(s\) label"):
        load_manifest(write_manifest(tmp_path, rows), CLASSES)


def test_empty_report_names_column_and_line(tmp_path):
    rows = good_rows()
    rows[2]["report_text"] = "  "
    with pytest.raises(UserError, match=r"column 'report_text': empty value at line\(s\) 4$"):
        load_manifest(write_manifest(tmp_path, rows), CLASSES)


def test_missing_image_is_reported_unless_images_are_not_needed(tmp_path):
    path = write_manifest(tmp_path, good_rows())
    (tmp_path / "images" / "3.png").unlink()
    with pytest.raises(UserError, match=r"'image_path': image file not found.* line\(s\) 5"):
        load_manifest(path, CLASSES)
    assert len(load_manifest(path, CLASSES, check_images=False)) == 4
    # Left to screening (extraction without --strict), the other checks still run.
    assert len(load_manifest(path, CLASSES, allow_missing_images=True)) == 4
    (tmp_path / "images" / "2.png").write_bytes((tmp_path / "images" / "0.png").read_bytes())
    with pytest.raises(UserError, match="the same image content is under two patients"):
        load_manifest(path, CLASSES, allow_missing_images=True)


def test_unknown_label_shows_the_value_found(tmp_path):
    rows = good_rows()
    rows[0]["label"] = "GC "  # looks like GC
    with pytest.raises(
        UserError, match=r"'label': label 'GC ' not among the configured classes .* line\(s\) 2$"
    ):
        load_manifest(write_manifest(tmp_path, rows), CLASSES)


def test_patient_in_two_splits(tmp_path):
    rows = good_rows()
    for row, split in zip(rows, ["train", "test", "val", "val"], strict=True):
        row["split"] = split
    with pytest.raises(UserError, match="more than one split at line"):
        load_manifest(write_manifest(tmp_path, rows), CLASSES)


def test_parquet_manifest(tmp_path):
    csv = write_manifest(tmp_path, good_rows())
    parquet = tmp_path / "manifest.parquet"
    pd.read_csv(csv, dtype=str).to_parquet(parquet)
    assert len(load_manifest(parquet, CLASSES)) == 4


def test_user_error_exits_2_with_one_line(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "patient_id"} for row in good_rows()]
    path = write_manifest(tmp_path, rows)
    code = (
        "from pipeline.errors import exit_on_user_error\n"
        "from pipeline.manifest import load_manifest\n"
        f"exit_on_user_error(lambda: load_manifest({str(path)!r}, ('VCD', 'GC')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: manifest {path}: missing column(s) patient_id; "
        "required columns are image_path, report_text, label, patient_id"
    ]


def one_line_error(path: Path, **options) -> str:
    with pytest.raises(UserError) as caught:
        load_manifest(path, CLASSES, **options)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_empty_file_and_header_only(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_bytes(b"")
    assert "is empty (0 bytes)" in one_line_error(path)
    path.write_text("image_path,report_text,label,patient_id\n")
    assert "has a header but no rows" in one_line_error(path)


@pytest.mark.parametrize(
    ("encoding", "report", "expected"),
    [
        ("latin1", "lésion", "byte 0xe9 at offset 54, line 2); it reads as latin1"),
        ("gbk", "声带白斑", "byte 0xc9 at offset 53, line 2); it reads as gb18030"),
    ],
)
def test_not_utf8_names_the_byte_and_the_fix(tmp_path, encoding, report, expected):
    path = tmp_path / "manifest.csv"
    header = "image_path,report_text,label,patient_id\n"
    path.write_bytes((header + f"images/a.png,{report},GC,1\n").encode(encoding))
    message = one_line_error(path, check_images=False)
    assert f"is not UTF-8 ({expected}" in message
    assert f"iconv -f {expected.split()[-1]} -t utf-8 {path}" in message


def test_utf8_with_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "manifest.csv"
    pd.DataFrame(good_rows()).to_csv(path, index=False, encoding="utf-8-sig")
    assert list(load_manifest(path, CLASSES, check_images=False).columns)[0] == "image_path"


@pytest.mark.parametrize(("delimiter", "name"), [(";", "semicolons"), ("\t", "tabs")])
def test_other_delimiter_is_named(tmp_path, delimiter, name):
    path = tmp_path / "manifest.csv"
    pd.DataFrame(good_rows()).to_csv(path, index=False, sep=delimiter)
    message = one_line_error(path, check_images=False)
    assert "missing column(s) image_path, report_text, label, patient_id" in message
    assert f"separated by {name}; save it comma-separated" in message


def test_malformed_csv(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("image_path,report_text,label,patient_id\na.png,x,GC,1\nb.png,y,GC,2,3,4\n")
    assert "is not a well-formed CSV file" in one_line_error(path, check_images=False)


def test_images_outside_the_manifest_folder_need_an_image_root(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    (tmp_path / "shared").mkdir()
    rows = good_rows()
    rows[1]["image_path"] = "../shared/x.png"
    rows[2]["image_path"] = str(tmp_path / "shared" / "y.png")  # absolute
    path = write_manifest(folder, rows)
    message = one_line_error(path)
    assert f"image outside the image root {folder}" in message and "line(s) 3, 4" in message
    with pytest.raises(UserError, match="outside the image root"):
        image_file(path, "../shared/x.png")
    # Named as the root, the common parent allows both; the checks that follow still run.
    assert len(load_manifest(path, CLASSES, image_root=tmp_path)) == 4
    assert image_file(path, "../shared/x.png", tmp_path) == tmp_path / "shared" / "x.png"
    # Fuse reads no image, so it does not judge where they are.
    assert len(load_manifest(path, CLASSES, check_images=False)) == 4


def test_one_image_content_under_two_patients_names_both_lines(tmp_path):
    rows = good_rows()
    for row, split in zip(rows, ["train", "train", "test", "test"], strict=True):
        row["split"] = split
    path = write_manifest(tmp_path, rows)
    (tmp_path / "images" / "3.png").write_bytes((tmp_path / "images" / "0.png").read_bytes())
    message = one_line_error(path)
    assert message.endswith(
        "column 'patient_id': the same image content is under two patients: "
        "line 2 (patient 000, label GC, split train) and "
        "line 5 (patient 001, label GC, split test)"
    )
    assert len(load_manifest(path, CLASSES, check_images=False)) == 4  # paths differ


def test_one_image_path_under_two_patients_without_the_images(tmp_path):
    rows = good_rows()
    rows[3]["image_path"] = "./images/0.png"
    path = write_manifest(tmp_path, rows, images=False)
    message = one_line_error(path, check_images=False)
    assert "the same image path is under two patients: line 2 " in message
    assert "and line 5 (patient 001" in message


def test_a_patient_with_two_labels_unless_labels_are_per_exam(tmp_path):
    rows = good_rows()
    rows[1]["label"] = "VCD"
    rows[1]["report_text"] = "另一次检查"
    path = write_manifest(tmp_path, rows)
    message = one_line_error(path)
    assert "column 'label': a patient has two labels" in message
    assert "line 2 (patient 000, label GC) and line 3 (patient 000, label VCD)" in message
    # Two reports are two exams (the default exam id), each with one label.
    assert len(load_manifest(path, CLASSES, labels_per_exam=True)) == 4
    rows[1]["report_text"] = rows[0]["report_text"]  # now one exam with two labels
    path = write_manifest(tmp_path, rows)
    assert "an exam has two labels" in one_line_error(path, labels_per_exam=True)


def test_exam_ids_are_counted_per_patient(tmp_path):
    rows = good_rows()
    for row in rows:
        row["exam_id"] = "1"  # numbered per patient: patients 000 and 001 both have exam 1
    rows[2]["label"] = rows[3]["label"] = "VCD"
    assert len(load_manifest(write_manifest(tmp_path, rows), CLASSES)) == 4


def test_empty_image_files_are_not_one_image(tmp_path):
    path = write_manifest(tmp_path, good_rows())
    for name in ("0.png", "3.png"):
        (tmp_path / "images" / name).write_bytes(b"")  # extraction skips them as zero-byte
    assert len(load_manifest(path, CLASSES)) == 4


def _patients_of_one_report(tmp_path, first: str, second: str, capsys) -> tuple[list, str]:
    rows = good_rows()[:2]  # one report, two images
    rows[0]["patient_id"], rows[1]["patient_id"] = first, second
    rows[0]["split"], rows[1]["split"] = "train", "test"
    try:
        table = load_manifest(write_manifest(tmp_path, rows), CLASSES)
    except UserError as error:
        return [], str(error)
    return list(table["patient_id"]), capsys.readouterr().err


@pytest.mark.parametrize(
    ("first", "second", "kept"),
    [("A0001", "A0001 ", "A0001"), ("007", "7", "007"), ("Ａ0001", "A0001", "Ａ0001")],
    ids=["trailing-space", "leading-zeros", "full-width"],
)
def test_one_patient_spelled_two_ways_is_one_patient(tmp_path, capsys, first, second, kept):
    # One patient in train and in test: the split check must see one patient and refuse.
    _, message = _patients_of_one_report(tmp_path, first, second, capsys)
    assert "a patient appears in more than one split at line(s) 2, 3" in message
    rows = good_rows()[:2]
    rows[0]["patient_id"], rows[1]["patient_id"] = first, second
    table = load_manifest(write_manifest(tmp_path, rows), CLASSES)
    assert list(table["patient_id"]) == [kept, kept]  # the file's first spelling
    warning = capsys.readouterr().err
    assert f"column 'patient_id': {second!r} (line 3) is taken as {first!r} (line 2)" in warning


def test_ids_differing_in_case_under_one_report_are_a_warning(tmp_path, capsys):
    rows = good_rows()[:2]
    rows[0]["patient_id"], rows[1]["patient_id"] = "A-0001", "a0001"
    table = load_manifest(write_manifest(tmp_path, rows), CLASSES)
    assert table["patient_id"].nunique() == 2  # kept apart: they may be two patients
    assert (
        "one report is under patients 'A-0001' (line 2) and 'a0001' (line 3), which differ "
        "only in case or punctuation" in capsys.readouterr().err
    )


def test_line_numbers_count_file_lines_when_a_report_spans_lines(tmp_path):
    rows = good_rows()
    rows[0]["report_text"] = "第一行\n第二行\n第三行"  # lines 2-4 of the file
    rows[2]["label"] = "GC "
    with pytest.raises(UserError, match=r"line\(s\) 6$"):
        load_manifest(write_manifest(tmp_path, rows), CLASSES)


def test_utf8_with_one_bad_byte_is_not_called_another_encoding(tmp_path):
    path = tmp_path / "manifest.csv"
    header = "image_path,report_text,label,patient_id\n"
    good = "".join(f"images/{i}.png,左侧声带白斑{i},GC,{i}\n" for i in range(3))
    path.write_bytes((header + good).encode() + b"images/x.png,\xff,GC,9\n")
    message = one_line_error(path, check_images=False)
    assert "is UTF-8 except for 1 byte sequence(s) that are not (first: byte 0xff" in message
    assert "line 5" in message and "iconv" not in message


def test_a_repeated_column_header_is_refused(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("image_path,report_text,label,patient_id,label\na.png,x,GC,1,VCD\n")
    message = one_line_error(path, check_images=False)
    assert "column(s) 'label' appear more than once in the header (line 1)" in message


def test_exact_repeated_rows_are_counted_once_with_a_warning(tmp_path, capsys):
    rows = good_rows()
    path = write_manifest(tmp_path, [*rows, rows[1]])
    table = load_manifest(path, CLASSES)
    assert len(table) == 4
    assert "1 row(s) repeat an earlier row exactly, at line(s) 6" in capsys.readouterr().err
