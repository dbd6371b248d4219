"""A synthetic demo data set: laryngoscopic images, Chinese reports and their manifest.

The images and reports carry complementary, imperfect evidence of the class (see
`patients.py`), so that image+report heads beat single-modality ones, as in the paper.
"""

from pipeline.demo.generate import DemoConfig, run

__all__ = ["DemoConfig", "run"]
