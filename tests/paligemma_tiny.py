"""A tiny PaliGemma-style tokenizer folder, built offline, for pi0 / pi0.5 tests.

LeRobot's pi0 and pi0.5 tokenize with `google/paligemma-3b-pt-224` (a SentencePiece BPE of 257152
tokens: `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, a `<bos>` before every text). This folder has
the same special tokens and the same `<bos> text` template with a BPE of at most
`robotrain.policies.pi0.DUMMY_VOCAB_SIZE` tokens, learned here from the tasks tests use and
pi0.5's state prompts, so `policy.tokenizer_name=<folder>` works with the dummy Gemma variant.

Run it as a script to write a folder: `python tests/paligemma_tiny.py /tmp/tiny_paligemma`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VOCAB_SIZE = 512
#: CLI overrides for a pi0 / pi0.5 that trains in seconds (add `policy.tokenizer_name=<folder>`).
PI0_TINY = ["policy.paligemma_variant=dummy", "policy.action_expert_variant=dummy", "policy.chunk_size=10",
            "policy.n_action_steps=10", "policy.image_resolution=[28,28]", "policy.tokenizer_max_length=24",
            "policy.num_inference_steps=2"]
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CORPUS = [
    "move the red dot onto the green target\n",
    "pick up the red cube\n",
    "push the blue block to the left\n",
    "open the drawer\n",
    "Task: move the red dot onto the green target, State: 0 12 127 128 200 255;\nAction: ",
    " ".join(str(i) for i in range(256)),
]


def build_tiny_paligemma_tokenizer(folder: Path) -> Path:
    """Write the tokenizer folder; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", SPECIAL_TOKENS.index("<bos>"))])
    assert tokenizer.get_vocab_size() <= VOCAB_SIZE
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024,
        "clean_up_tokenization_spaces": False, **special}, indent=2))
    return folder


if __name__ == "__main__":
    print(build_tiny_paligemma_tokenizer(Path(sys.argv[1])))
