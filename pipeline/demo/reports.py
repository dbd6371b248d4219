"""Chinese laryngoscopy reports written from a patient's planned findings.

A report states the lesion's site and size, its appearance (a loose echo of what the
images show), its extent and the cords' mobility (which the images do not show), and ends
with a neutral impression that never names the diagnosis. The external hospital writes
the same findings in its own way: another header, another sentence order and synonyms for
part of the clinical vocabulary.
"""

from __future__ import annotations

import numpy as np

from pipeline.demo.patients import EXTERNAL_SITE, INTERNAL_SITE, Lesion, Patient

CORD_LENGTH_MM = 16  # an adult true vocal cord, anterior commissure to vocal process
SIZE_ERROR = 0.7  # standard deviation of log(reported size / drawn size)

APPEARANCE_WORDS = (  # by patients.APPEARANCE_CUTS category: smooth white .. cauliflower
    ("白色斑块附着，表面尚光滑", "白色斑块，边界清楚"),
    ("白色斑块，表面粗糙", "白色斑块，表面粗糙不平"),
    ("新生物，表面粗糙，红白相间", "新生物，表面粗糙，局部充血"),
    ("菜花样新生物，表面不平", "菜花样新生物，触之易出血"),
)
EXTENT_WORDS = (  # by patients.EXTENT_CUTS category
    ("未累及前联合", "病变局限于声带，未累及前联合"),
    ("累及前联合", "前端达前联合"),
    ("累及前联合，侵及室带", "累及前联合及同侧室带"),
)
MOBILITY_WORDS = ("活动正常", "活动稍受限", "活动受限", "固定")  # by patients.MOBILITY_CUTS
CLOSURE_WORDS = ("声门闭合可", "声门闭合可", "声门闭合欠佳", "声门闭合不全")  # by mobility
IMPRESSION_NOUNS = ("白斑样病变", "白斑样病变", "新生物", "新生物")  # by appearance
RECOMMENDATIONS = ("建议活检明确病理性质", "建议取活检送病理检查", "请结合病理检查")
ROUTINE_FINDINGS = (  # unremarkable structures; a few per report make reports differ
    "鼻咽部未见明显异常",
    "会厌舌面光滑",
    "会厌谷清晰",
    "双侧梨状窝对称，未见积液",
    "杓区黏膜光滑",
    "双侧杓会厌襞未见明显异常",
)
CONGESTION_SHARE = 0.3  # reports mentioning congested surroundings, whatever the class
ROUTINE_FINDINGS_PER_REPORT = 2

THIRD_NAMES = ("前", "中", "后")
# How many thirds a lesion must cover, as a share of one third, to be named as in it.
THIRD_COVER = 0.3

# The external hospital's vocabulary: each pair is swapped with EXTERNAL_SYNONYM_SHARE
# probability per report, so its reports share much, not all, of the internal wording.
EXTERNAL_SYNONYMS = (
    ("前联合", "前连合"),
    ("活动", "运动"),
    ("白色斑块", "白斑样物"),
    ("新生物", "肿物"),
    ("表面粗糙", "表面不光滑"),
    ("菜花样", "菜花状"),
    ("室带", "假声带"),
    ("声门闭合", "发声时声门闭合"),
    ("建议", "宜"),
)
EXTERNAL_SYNONYM_SHARE = 0.6


def _side_words(lesion: Lesion) -> str:
    if len(lesion.sides) == 2:
        return "双侧"
    return "左侧" if lesion.sides[0] == "left" else "右侧"


def _segment_words(lesion: Lesion, third_style: bool) -> str:
    """The thirds the lesion covers: 前中段 (or 前中1/3), 全长 for all three."""
    thirds = [
        THIRD_NAMES[third]
        for third in range(3)
        if min(lesion.end, (third + 1) / 3) - max(lesion.start, third / 3) > THIRD_COVER / 3
    ] or [THIRD_NAMES[min(2, int(3 * (lesion.start + lesion.end) / 2))]]
    if len(thirds) == 3:
        return "全长"
    return "".join(thirds) + ("1/3" if third_style else "段")


def _size_words(lesion: Lesion, rng: np.random.Generator) -> str:
    # Sizes judged through an endoscope are rough; the error (a factor of about two) also
    # keeps them a weak echo of the lesion's size and bulk in the images.
    length, width = np.array(
        [(lesion.end - lesion.start) * CORD_LENGTH_MM, 2 + 3 * lesion.severity]
    ) * np.exp(rng.normal(0, SIZE_ERROR, 2))
    return f"范围约{max(2, round(length))}×{max(1, round(width))}mm"


def _mobility_sentence(patient: Patient) -> str:
    if patient.mobility == 0:
        return "双侧声带" + MOBILITY_WORDS[0]
    side = _side_words(patient.lesion)
    if side == "双侧":
        return "双侧声带" + MOBILITY_WORDS[patient.mobility]
    other = "右侧" if side == "左侧" else "左侧"
    return f"{side}声带{MOBILITY_WORDS[patient.mobility]}，{other}声带{MOBILITY_WORDS[0]}"


def _findings(patient: Patient, rng: np.random.Generator, third_style: bool) -> dict[str, str]:
    """The report's sentences, keyed by role; each style arranges them its own way."""
    lesion = patient.lesion
    lesion_sentence = (
        f"{_side_words(lesion)}声带{_segment_words(lesion, third_style)}见"
        f"{rng.choice(APPEARANCE_WORDS[patient.appearance])}，{_size_words(lesion, rng)}"
    )
    if rng.random() < CONGESTION_SHARE:
        lesion_sentence += "，周围黏膜充血"
    routine = rng.choice(len(ROUTINE_FINDINGS), ROUTINE_FINDINGS_PER_REPORT, replace=False)
    return {
        "routine": "，".join(ROUTINE_FINDINGS[index] for index in sorted(routine)),
        "lesion": lesion_sentence,
        "extent": str(rng.choice(EXTENT_WORDS[patient.extent])),
        "mobility": f"{_mobility_sentence(patient)}，{CLOSURE_WORDS[patient.mobility]}",
        "impression": (
            f"{_side_words(lesion)}声带{IMPRESSION_NOUNS[patient.appearance]}，"
            f"{rng.choice(RECOMMENDATIONS)}"
        ),
    }


def _internal_report(patient: Patient, rng: np.random.Generator) -> str:
    parts = _findings(patient, rng, third_style=False)
    return (
        "电子喉镜检查报告\n"
        f"检查所见：{parts['routine']}。{parts['lesion']}，{parts['extent']}。"
        f"{parts['mobility']}。\n"
        f"检查提示：{parts['impression']}。"
    )


def _external_report(patient: Patient, rng: np.random.Generator) -> str:
    parts = _findings(patient, rng, third_style=True)
    text = (
        "耳鼻咽喉科 纤维喉镜检查\n"
        f"镜检描述：{parts['mobility']}。{parts['lesion']}，{parts['extent']}。"
        f"{parts['routine']}。\n"
        f"诊断意见：{parts['impression']}。"
    )
    for word, synonym in EXTERNAL_SYNONYMS:
        if rng.random() < EXTERNAL_SYNONYM_SHARE:
            text = text.replace(word, synonym)
    return text


REPORT_WRITERS = {INTERNAL_SITE.name: _internal_report, EXTERNAL_SITE.name: _external_report}


def write_report(patient: Patient) -> str:
    """The patient's examination report, from the patient's own "report" random stream."""
    return REPORT_WRITERS[patient.site.name](patient, patient.rng("report"))
