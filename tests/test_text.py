"""umT5: our encoder against transformers' UMT5EncoderModel (weights through our converter), at TP=1 and
TP=2, with padding in the batch; our tokenizer against transformers' T5 tokenizer on a sentencepiece model
trained here."""

import dataclasses
import io

import pytest
import torch

from megawan.config import TextConfig, text_config_from, text_preset
from megawan.convert import convert_state_dict
from megawan.models.text import UMT5Encoder, UMT5Tokenizer
from megawan.models.text.tokenizer import clean_caption
from megawan.parallel.launch import spawn_local
from wan_reference import relative_error

TOL = 1e-5


def transformers_umt5(cfg: TextConfig, seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    model = UMT5EncoderModel(UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_heads=cfg.num_heads,
        num_layers=cfg.num_layers, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance, layer_norm_epsilon=cfg.layer_norm_epsilon,
        feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
    ))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _batch(cfg, length=40):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, 25:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_encoder_matches_transformers_with_padding():
    cfg = text_preset("tiny")
    ref = transformers_umt5(cfg)
    ours = UMT5Encoder(cfg).eval()
    ours.load_state_dict(convert_state_dict(ref.state_dict(), src="transformers", dst="megawan", config=cfg))
    ids, mask = _batch(cfg)  # 40 tokens: relative distances beyond the exact buckets
    with torch.no_grad():
        states = ours(ids, mask)
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    assert relative_error(states, expected) <= TOL
    assert torch.count_nonzero(states[2, 4:]) == 0  # padded positions are zero, as Wan feeds the DiT


def _tp_worker(rank, cfg_dict, sd_path, out_dir):
    from megatron.core import parallel_state

    cfg = TextConfig(**cfg_dict)
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    enc = UMT5Encoder(cfg).eval()
    enc.load_state_dict(convert_state_dict(torch.load(sd_path), "megawan", "megawan", cfg, tp_size=tp)[tp_rank])
    with torch.no_grad():
        torch.save(enc(*_batch(cfg)), f"{out_dir}/rank{rank}.pt")


def test_tensor_parallel_encoder_matches_transformers(tmp_path):
    cfg = text_preset("tiny")
    ref = transformers_umt5(cfg)
    torch.save(convert_state_dict(ref.state_dict(), "transformers", "megawan", cfg), tmp_path / "sd.pt")
    spawn_local(_tp_worker, world_size=2, tensor_parallel=2, args=(dataclasses.asdict(cfg), str(tmp_path / "sd.pt"), str(tmp_path)))
    ids, mask = _batch(cfg)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    for r in range(2):
        assert relative_error(torch.load(tmp_path / f"rank{r}.pt"), expected) <= TOL


def test_official_and_transformers_names_round_trip_bit_exact():
    cfg = text_preset("tiny")
    hf = {k: v.to(torch.bfloat16) for k, v in transformers_umt5(cfg).state_dict().items()}
    official = convert_state_dict(hf, src="transformers", dst="official", config=cfg)
    assert "blocks.1.ffn.gate.0.weight" in official and "blocks.0.pos_embedding.embedding.weight" in official
    ours = convert_state_dict(official, src="official", dst="megawan", config=cfg)
    back = convert_state_dict(ours, src="megawan", dst="transformers", config=cfg)
    assert set(back) == set(hf)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], hf[k]) for k in hf)


def test_config_from_transformers_and_xxl_size():
    cfg = text_preset("tiny")
    back = text_config_from(transformers_umt5(cfg).config.to_dict(), text_len=cfg.text_len)
    assert dataclasses.replace(back, name="tiny") == cfg
    from megawan.convert.text_keys import text_param_shapes

    xxl = sum(torch.Size(s).numel() for s in text_param_shapes(text_preset("umt5-xxl")).values())
    assert xxl == 5_680_910_336  # umT5-XXL encoder: 1.05B embedding + 24 layers


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    """A sentencepiece model trained here on a few KB of captions, with T5's ids (pad 0, eos 1, unk 2)."""
    import sentencepiece as spm

    sentences = ["A red ball rolls to the left across a white floor", "A blue square moves up slowly",
                 "The green triangle spins under a bright sky", "一只红色的球向左滚动", "蓝色的方块向上移动",
                 "Two yellow circles bounce &amp; collide", "a purple star drifts right"] * 40
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=200,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    folder = tmp_path_factory.mktemp("spiece")
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder


CAPTIONS = ["a red ball rolls left", "一只红色的球 向左滚动", "emoji 🙂 here", "  extra   spaces\tand\nnewlines  ", "",
            "A very long caption about a blue square " * 8, "&amp;lt; html &amp; entities &gt;", "Ünïcödé caps"]


def test_tokenizer_matches_transformers_t5_tokenizer(spiece):
    from transformers import T5Tokenizer

    ours = UMT5Tokenizer(str(spiece / "spiece.model"), max_length=24)
    theirs = T5Tokenizer.from_pretrained(str(spiece), extra_ids=0)
    ids, mask = ours(CAPTIONS)
    # Wan cleans captions, then calls the transformers tokenizer with these arguments
    expected = theirs([clean_caption(c) for c in CAPTIONS], padding="max_length", truncation=True, max_length=24,
                      add_special_tokens=True, return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"])
    assert torch.equal(mask, expected["attention_mask"])
    assert ids[4].tolist() == [1] + [0] * 23  # an empty caption is just EOS
    assert mask[5].sum() == 24 and ids[5, -1] == 1  # truncated, EOS kept


def test_cleaning_is_wans():
    assert clean_caption("  a \t b\n\nc  ") == "a b c"
    assert clean_caption("&amp;lt;b&amp;gt;") == "<b>"
