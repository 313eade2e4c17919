"""A tiny SmolVLM backbone folder, built offline, for SmolVLA tests.

SmolVLA (LeRobot's and ours) reads its backbone's config and tokenizer from
`policy.vlm_model_name`, which may be a local folder; with `load_vlm_weights=false` no weights
are read. `build_tiny_smolvlm(folder)` writes such a folder in the layout of
`HuggingFaceTB/SmolVLM2-500M-Video-Instruct`, scaled down to the size LeRobot's reference keys
(tests/data/lerobot_keys/smolvla_keys.json) were made with:

    config.json                     SmolVLM: llama text model (hidden 64, 4 layers, 4 heads,
                                    2 kv heads, vocab 320) + vision model (hidden 32, 2 layers,
                                    64 px images, 16 px patches), scale_factor 2
    tokenizer.json                  byte-level BPE trained here on a few sentences, with
    tokenizer_config.json           SmolVLM's special tokens (`<|im_end|>` pads, `<image>`,
    special_tokens_map.json         `<fake_token_around_image>`, `<global-img>`, ...)
    preprocessor_config.json        SmolVLMImageProcessor settings (read by LeRobot's
    video_preprocessor_config.json  `AutoProcessor`; robotrain itself reads only the config
    processor_config.json           and the tokenizer)

Run it as a script to write a folder: `python tests/smolvlm_tiny.py /tmp/tiny_smolvlm`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VOCAB_SIZE = 320
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
    "<global-img>", "<end_of_utterance>", "<unk>",
]
EXTRA_SPECIAL_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
#: What the BPE merges are learned from: the embedded task and LeRobot's reference tasks.
CORPUS = [
    "move the red dot onto the green target\n",
    "pick up the red cube\n",
    "push the blue block to the left\n",
    "open the drawer\n",
    "User: What do you see in the image?<end_of_utterance>\nAssistant: a robot arm and a table.\n",
]
IMAGE_SIZE, PATCH_SIZE, SCALE_FACTOR = 64, 16, 2


def smolvlm_config() -> dict:
    image_seq_len = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
    return {
        "architectures": ["SmolVLMForConditionalGeneration"],
        "model_type": "smolvlm",
        "image_token_id": SPECIAL_TOKENS.index("<image>"),
        "scale_factor": SCALE_FACTOR,
        "tie_word_embeddings": False,
        "use_cache": True,
        "pad_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
        "text_config": {
            "model_type": "llama",
            "architectures": ["VLlama3ForCausalLM"],
            "vocab_size": VOCAB_SIZE,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "hidden_act": "silu",
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "pad_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
            "bos_token_id": SPECIAL_TOKENS.index("<|im_start|>"),
            "eos_token_id": SPECIAL_TOKENS.index("<end_of_utterance>"),
        },
        "vision_config": {
            "model_type": "smolvlm_vision",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_channels": 3,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
        "_image_seq_len": image_seq_len,
    }


def train_tokenizer():
    """A byte-level BPE (GPT-2 style, like SmolVLM's) with at most VOCAB_SIZE entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    assert tokenizer.get_vocab_size() <= VOCAB_SIZE
    return tokenizer


def build_tiny_smolvlm(folder: Path) -> Path:
    """Write the tiny SmolVLM folder (no weights); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = smolvlm_config()
    image_seq_len = config.pop("_image_seq_len")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    train_tokenizer().save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|im_end|>",
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {**special, "additional_special_tokens": list(EXTRA_SPECIAL_TOKENS.values())}, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer",
        "processor_class": "SmolVLMProcessor",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "legacy": False,
        **special,
        "extra_special_tokens": EXTRA_SPECIAL_TOKENS,
    }, indent=2))
    image_processor = {
        "image_processor_type": "SmolVLMImageProcessor",
        "processor_class": "SmolVLMProcessor",
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
        "do_pad": True, "do_image_splitting": False,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "resample": 1, "rescale_factor": 1 / 255,
        "size": {"longest_edge": IMAGE_SIZE}, "max_image_size": {"longest_edge": IMAGE_SIZE},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    video_processor = {**image_processor, "video_processor_type": "SmolVLMVideoProcessor",
                       "video_sampling": {"fps": 1, "max_frames": 4, "video_size": {"longest_edge": IMAGE_SIZE}}}
    del video_processor["image_processor_type"]
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video_processor, indent=2))
    (folder / "processor_config.json").write_text(json.dumps(
        {"processor_class": "SmolVLMProcessor", "image_seq_len": image_seq_len}, indent=2))
    return folder


if __name__ == "__main__":
    print(build_tiny_smolvlm(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny_smolvlm")))
