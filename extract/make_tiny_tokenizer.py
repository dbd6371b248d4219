"""Rebuild the offline tokenizer that `--weights tiny` text encoders use.

    python -m extract.make_tiny_tokenizer [--out extract/model_configs/tiny-zh-tokenizer]

A byte-level BPE (the scheme LLaMA-3 uses) trained on the small corpus of Chinese
laryngoscopy phrasing below: byte-level, so any text, Chinese or not, tokenises without
unknown tokens. Like LLaMA-3's tokenizer it prepends <|begin_of_text|> and has no pad
token (the text encoder sets one). After a rebuild, set `vocab_size` in the tiny config of
every text encoder that uses it (tests/extract checks that they match).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
TARGET_VOCAB_SIZE = 1536  # small, yet enough merges to cover whole words of the corpus
DEFAULT_OUT = Path(__file__).parent / "model_configs" / "tiny-zh-tokenizer"

CORPUS = (
    "电子喉镜检查：鼻咽部黏膜光滑，未见新生物，咽隐窝对称。",
    "会厌舌面及喉面光滑，会厌谷对称，未见异常。",
    "双侧杓状软骨及杓会厌襞未见明显异常，黏膜稍充血。",
    "双侧室带对称，无肿胀，表面光滑。",
    "左侧声带前中段可见白色斑块样新生物，表面粗糙，边界欠清。",
    "右侧声带前中段可见白斑，表面欠光滑，范围约0.5cm×0.3cm。",
    "左侧声带全长黏膜增厚，表面见菜花样新生物，累及前联合。",
    "右侧声带中后段见淡红色新生物，表面不平，触之易出血。",
    "双侧声带前中段黏膜增厚，表面可见角化物附着。",
    "左侧声带前端至中段见乳头状新生物，基底较宽。",
    "新生物累及前联合及对侧声带前端，向下累及声门下。",
    "双侧声带运动正常，声门闭合可。",
    "左侧声带运动受限，声门闭合欠佳。",
    "右侧声带固定，声门闭合不全，发音时声门呈裂隙。",
    "声门下未见明显异常，气管上段黏膜光滑。",
    "双侧梨状窝对称，未见积液，黏膜光滑。",
    "环后区及下咽后壁未见新生物。",
    "NBI模式下病变区可见斑点状血管，IPCL扭曲扩张，Ni分型Ⅳ型。",
    "NBI下可见蛇形及蝌蚪样血管，Ni分型Ⅴa型，边界清楚。",
    "NBI下病变表面可见散在褐色斑点，Ni分型Ⅴb型。",
    "窄带成像下病变表面血管纹理紊乱，与周围正常黏膜分界清楚。",
    "白光下病变表面呈颗粒状，局部溃疡形成，覆白色伪膜。",
    "病变表面呈桑葚样改变，质地较脆，范围约占声带全长的二分之一。",
    "左侧声带黏膜弥漫性增厚，表面粗糙不平，呈灰白色。",
    "右侧声带游离缘可见局限性隆起，表面光滑，考虑息肉样变。",
    "声带边缘毛糙，黏膜慢性充血，声门上结构未见异常。",
    "喉室未见新生物，双侧喉室对称。",
    "印象：左侧声带新生物，性质待定，建议活检。",
    "印象：右侧声带白斑，建议定期复查喉镜。",
    "印象：声带新生物，喉癌待排，建议住院进一步治疗。",
    "印象：双侧声带白斑伴角化，建议病理检查。",
    "诊断意见：左声带前中段病变，恶性可能性大。",
    "诊断意见：声带黏膜白斑病，不典型增生待排除。",
    "建议：结合病理结果，必要时行支撑喉镜下手术。",
    "患者声音嘶哑三个月，加重一周，无呼吸困难，无吞咽困难。",
    "主诉：声嘶半年余，伴咽部异物感，吸烟史二十年。",
    "既往有长期吸烟饮酒史，否认发热咳嗽。",
    "颈部未触及明显肿大淋巴结。",
    "镜下所见：左侧声带前三分之一黏膜白色隆起，表面角化明显。",
    "镜下所见：右侧声带中段新生物，呈结节状，表面血管增多。",
    "双侧声带充血水肿，右侧声带前中段见小片状白斑。",
    "左侧声带前联合处见肉芽样新生物，表面有分泌物附着。",
    "病变局限于声带膜部，未超过声带突。",
    "病变向后累及声带突，向上累及室带。",
    "喉部结构对称，黏膜无充血，各部未见新生物。",
    "电子喉镜及窄带成像检查，图像采集十四张。",
    "检查过程顺利，患者配合良好，术后禁食两小时。",
)


def train_tokenizer(corpus: Sequence[str], vocab_size: int = TARGET_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE on `corpus`; ids 0 and 1 are the begin/end-of-text tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BEGIN_OF_TEXT, END_OF_TEXT],
        # Every byte is in the vocabulary, so no text ever needs an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT} $A",
        pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT} $B",
        special_tokens=[(BEGIN_OF_TEXT, tokenizer.token_to_id(BEGIN_OF_TEXT))],
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, folder: Path) -> PreTrainedTokenizerFast:
    """Save `tokenizer` as a folder that `AutoTokenizer.from_pretrained` loads offline."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BEGIN_OF_TEXT,
        eos_token=END_OF_TEXT,
        model_input_names=["input_ids", "attention_mask"],
    )
    wrapped.save_pretrained(folder)
    # The class name LLaMA-3 ships with: transformers 4.x knows it, 5.x maps it to its own.
    config_path = Path(folder) / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write")
    args = parser.parse_args()
    saved = save_tokenizer(train_tokenizer(CORPUS), args.out)
    print(f"wrote {args.out}: vocabulary of {len(saved)} tokens")


if __name__ == "__main__":
    main()
