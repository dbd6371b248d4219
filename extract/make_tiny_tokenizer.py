"""Rebuild the offline tokenizers that `--weights tiny` text encoders use.

    python -m extract.make_tiny_tokenizer [--out-dir extract/model_configs]

Three folders, each shaped like the real tokenizer of a family of encoders and trained or
built on the small corpus of Chinese laryngoscopy phrasing below (plus the demo's report
vocabulary):

- tiny-zh-tokenizer: a byte-level BPE, the scheme LLaMA-3 uses. Like LLaMA-3's tokenizer
  it prepends <|begin_of_text|> and has no pad token (the text encoder sets one).
- tiny-clip-tokenizer: a lower-casing byte-level BPE that wraps each text in
  <|startoftext|> ... <|endoftext|> and pads with <|endoftext|>, as CLIP's does; CLIP's
  text tower pools the <|endoftext|> position.
- tiny-bert-zh-tokenizer: a BERT WordPiece vocabulary ([CLS] ... [SEP]) of single
  characters, which is how BERT tokenises Chinese; for the BERT-style towers (ALIGN,
  Chinese-CLIP, BLIP-2's Q-Former, ViLT, your own BERT).

Byte-level ones tokenise any text without unknown tokens; the WordPiece one maps
characters outside its vocabulary to [UNK]. After a rebuild, set `vocab_size` in the tiny
config of every encoder that uses one (tests/extract checks that they match).
"""

from __future__ import annotations

import argparse
import json
import string
from collections.abc import Callable, Sequence
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import BertTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
CLIP_START, CLIP_END = "<|startoftext|>", "<|endoftext|>"
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
FULL_WIDTH_PUNCTUATION = "，。、；：？！（）“”‘’《》【】—…～×"
TARGET_VOCAB_SIZE = 1536  # small, yet enough merges to cover whole words of the corpus
MODEL_CONFIGS = Path(__file__).parent / "model_configs"
# Where the demo's reports get their words: the WordPiece vocabulary takes its characters.
DEMO_REPORTS_MODULE = Path(__file__).parents[1] / "pipeline" / "demo" / "reports.py"

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


def train_tokenizer(
    corpus: Sequence[str],
    vocab_size: int = TARGET_VOCAB_SIZE,
    begin: str = BEGIN_OF_TEXT,
    end: str = END_OF_TEXT,
    wrap_with_end: bool = False,
    lowercase: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE on `corpus`; ids 0 and 1 are the begin/end-of-text tokens.

    Args:
        begin, end: the special tokens, prepended (and with `wrap_with_end` appended).
        lowercase: lower-case texts first, as CLIP's tokenizer does.
    """
    tokenizer = Tokenizer(models.BPE())
    if lowercase:
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[begin, end],
        # Every byte is in the vocabulary, so no text ever needs an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    special_ids = [(begin, tokenizer.token_to_id(begin)), (end, tokenizer.token_to_id(end))]
    if wrap_with_end:
        single, pair = f"{begin} $A {end}", f"{begin} $A {end} {begin} $B {end}"
    else:
        single, pair = f"{begin} $A", f"{begin} $A {begin} $B"
        special_ids = special_ids[:1]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special_ids
    )
    return tokenizer


def save_tokenizer(
    tokenizer: Tokenizer, folder: Path, **special_tokens: str
) -> PreTrainedTokenizerFast:
    """Save `tokenizer` as a folder that `AutoTokenizer.from_pretrained` loads offline.

    Args:
        special_tokens: bos_token, eos_token, pad_token ... (default: LLaMA-3's, no pad).
    """
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **(special_tokens or {"bos_token": BEGIN_OF_TEXT, "eos_token": END_OF_TEXT}),
        model_input_names=["input_ids", "attention_mask"],
    )
    wrapped.save_pretrained(folder)
    # The class name LLaMA-3 ships with: transformers 4.x knows it, 5.x maps it to its own.
    config_path = Path(folder) / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    return wrapped


def _file_text(module: Path) -> str:
    """The whole text of a source file: the characters of its Chinese phrases are what count."""
    return module.read_text(encoding="utf-8")


def wordpiece_vocabulary(texts: Sequence[str]) -> list[str]:
    """BERT special tokens, printable ASCII, full-width punctuation and every non-ASCII
    character of `texts` (after BERT's lower-casing normaliser), each also as a word
    continuation (##x): WordPiece turns a whole word into [UNK] when one piece is missing."""
    normaliser = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=False)
    characters = {char for text in texts for char in normaliser.normalize_str(text)}
    characters |= set(FULL_WIDTH_PUNCTUATION)
    wide = sorted(char for char in characters if ord(char) > 127 and not char.isspace())
    ascii_tokens = [char for char in string.printable if not char.isspace() and not char.isupper()]
    pieces = [*ascii_tokens, *wide]
    return [*BERT_SPECIAL_TOKENS, *pieces, *("##" + piece for piece in pieces)]


def build_bert_tokenizer(folder: Path, texts: Sequence[str]) -> PreTrainedTokenizerBase:
    """Write a lower-casing BERT WordPiece tokenizer whose vocabulary covers `texts`."""
    vocabulary = {token: index for index, token in enumerate(wordpiece_vocabulary(texts))}
    tokenizer = BertTokenizer(vocab=vocabulary, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _llama_like(folder: Path) -> PreTrainedTokenizerBase:
    return save_tokenizer(train_tokenizer(CORPUS), folder)


def _clip_like(folder: Path) -> PreTrainedTokenizerBase:
    tokenizer = train_tokenizer(
        CORPUS, 1024, CLIP_START, CLIP_END, wrap_with_end=True, lowercase=True
    )
    return save_tokenizer(
        tokenizer, folder, bos_token=CLIP_START, eos_token=CLIP_END, pad_token=CLIP_END
    )


def _bert_like(folder: Path) -> PreTrainedTokenizerBase:
    return build_bert_tokenizer(folder, [*CORPUS, _file_text(DEMO_REPORTS_MODULE)])


TOKENIZERS: dict[str, Callable[[Path], PreTrainedTokenizerBase]] = {
    "tiny-zh-tokenizer": _llama_like,
    "tiny-clip-tokenizer": _clip_like,
    "tiny-bert-zh-tokenizer": _bert_like,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir", type=Path, default=MODEL_CONFIGS, help="folder to write the tokenizers into"
    )
    args = parser.parse_args()
    for name, build in TOKENIZERS.items():
        saved = build(args.out_dir / name)
        print(f"wrote {args.out_dir / name}: vocabulary of {len(saved)} tokens")


if __name__ == "__main__":
    main()
