"""The extract stage's settings (`python -m extract --help` shows them)."""

from __future__ import annotations

from dataclasses import dataclass

from extract.registry import LOADERS
from pipeline.config import setting


@dataclass(frozen=True)
class ExtractConfig:
    """What to encode, with which encoders and weights, and where to write the vectors."""

    model: tuple[str, ...] = setting(
        (),
        "registered encoder(s): built-in ones (listed above; one JSON file each in "
        "extract/model_configs/) or --registry's. Several, all of one modality (image, text "
        "or pair), are one pass: each image is read and decoded once for all of them, a "
        "checkpoint they share is loaded once and run once per batch, and each writes its "
        "own file, as a run of it alone would",
    )
    registry: str = setting(
        "",
        "YAML (or JSON) file of your own encoders, added to the built-in ones: each "
        "top-level name maps to source (a local Hugging Face folder or hub id), modality "
        "and pooling (see README); python -m extract --list --registry FILE shows them",
    )
    weights: tuple[str, ...] = setting(
        ("tiny",),
        "one value for every --model, or one per model: 'tiny': seeded random weights of a "
        "small config of the same architecture (offline; for tests and demos); 'hub': the "
        "real weights from the local Hugging Face cache (never downloads); or a FOLDER "
        "holding a downloaded checkpoint",
    )
    manifest: str = setting("", "manifest CSV/Parquet; image paths are relative to its folder")
    out: str = setting(
        "",
        "FILE.h5 (one --model) or a FOLDER, which gets FOLDER/<model>.h5 per model; finished "
        "batches go to FILE.h5.parts/ at once, so the same command resumes a killed run; a "
        "file is written as FILE.h5.partial and renamed when complete; FILE.h5.lock keeps a "
        "second run out of each file",
    )
    classes: tuple[str, ...] = setting(("VCD", "GC"), "labels the manifest may use, negative first")
    pooling: tuple[str, ...] = setting(
        ("auto",),
        "how tokens become one vector, part of the features' identity; one value for every "
        "--model, or one per model: auto (the encoder's registered pooling) or one its loader "
        "offers: "
        + "; ".join(f"{name} {'|'.join(loader.poolings)}" for name, loader in LOADERS.items()),
    )
    batch_size: int = setting(32, "images or reports per forward pass, per process", at_least=1)
    device: str = setting(
        "auto", "auto (this process's GPU if there is one, else cpu), cpu, cuda or cuda:N"
    )
    dtype: str = setting(
        "float32",
        "model precision: float32, bfloat16 (a GPU, or a CPU with bf16 units) or float16 "
        "(a GPU only); vectors are saved as float32 either way",
    )
    num_workers: int = setting(
        2,
        "processes decoding images while the encoders run (0: decode inline, which can be "
        "as fast on a machine with 2 cores)",
        at_least=0,
    )
    wait_for_lock: float = setting(
        0,
        "seconds to wait, per output, while another run writes it (0: refuse at once, exit "
        "code 2, naming the other run)",
        at_least=0,
    )
    overwrite: bool = setting(
        False,
        "true: replace a complete output holding vectors of another encoder or modality, or "
        "of other data (no item in common); false: refuse, so a typo costs no finished work",
    )
    image_root: str = setting(
        "",
        "folder every image must lie in (paths stay relative to the manifest's folder); "
        "empty: the manifest's folder, so paths like ../x.png are refused",
    )
    labels_per_exam: bool = setting(
        False,
        "true: a patient's exams (exam_id) may have different labels; false: one label per patient",
    )
    strict: bool = setting(
        False,
        "true: refuse (exit code 2) a manifest with any bad item (a missing, empty or "
        "damaged image file; an empty report or one with control characters) before any "
        "encoder loads; false: skip them, record them in the file and print a summary",
    )
