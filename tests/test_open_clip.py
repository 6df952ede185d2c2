"""CDDSModel (open_clip wrapper) and CDDSLoss as open_clip's trainer uses them, on CPU."""

from __future__ import annotations

import json
import math
import socket

import open_clip
import pytest
import torch
import torch.nn.functional as F

from cdds_fast import CDDSLoss
from cdds_fast.contract import LOSS_KEYS
from cdds_fast.open_clip import CDDSModel, load_cdds_checkpoint, text_valid_mask
from tests._openclip_fixtures import (
    HEADS,
    TINY_MODEL,
    TINY_RESNET_MODEL,
    ddp_worker,
    tiny_config_dir,
)

HEAD_KW = dict(heads=HEADS, n_enc=1, n_dec=2, z=2, sigma=0.1)


@pytest.fixture(scope="module")
def tokenizer():
    tiny_config_dir()
    return open_clip.get_tokenizer(TINY_MODEL)


def make_clip(**kwargs) -> torch.nn.Module:
    tiny_config_dir()
    return open_clip.create_model(TINY_MODEL, output_dict=True, **kwargs)


def batch(tokenizer, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    words = ["red", "a blue square", "two green circles on the left", "yellow", "a purple star"]
    texts = tokenizer([words[i % len(words)] for i in range(n)])
    return images, texts


def test_forward_outputs_shapes_and_features(tokenizer):
    torch.manual_seed(0)
    model = CDDSModel(make_clip(), **HEAD_KW)
    images, texts = batch(tokenizer, 3)
    out = model(images, texts)
    b, d = 3, 32
    assert out["image_tokens"].shape == (b, 16, d)  # (32 / 8)^2 patches, CLS dropped
    assert out["text_tokens"].shape == (b, 16, d)
    for k in ("image_semantic", "image_modality"):
        assert out[k].shape == out["image_tokens"].shape
    for k in ("text_semantic", "text_modality"):
        assert out[k].shape == out["text_tokens"].shape
    assert out["text_mask"].dtype == torch.bool
    # valid up to and including the end-of-text token (the argmax id for the default tokenizer)
    eot = texts.argmax(-1)
    assert torch.equal(out["text_mask"].sum(1), eot + 1)
    for name in ("alpha_image", "alpha_text", "w_s_image", "w_m_image", "w_s_text", "w_m_text"):
        assert out[name].shape == (b, d)
        assert torch.equal(out[name][1], getattr(model.head, name))
    assert out["logit_scale"].dim() == 0
    assert torch.allclose(out["logit_scale"], model.clip.logit_scale.exp())
    for k, v in out.items():
        if k != "logit_scale":
            assert v.shape[0] == b, k
    # features = L2-normalised masked mean of the semantic components (docs/method.md section 5)
    img = F.normalize(out["image_semantic"].float().mean(1), dim=-1)
    m = out["text_mask"].float()[..., None]
    txt = F.normalize((out["text_semantic"] * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(out["image_features"], img)
    torch.testing.assert_close(out["text_features"], txt)
    assert not any(k in out for k in ("loss", "logits", "labels", "logit_bias"))


def test_encode_matches_forward_in_eval_and_partial_inputs(tokenizer):
    model = CDDSModel(make_clip(), **HEAD_KW).eval()
    images, texts = batch(tokenizer, 4)
    with torch.no_grad():
        out = model(images, texts)
        torch.testing.assert_close(
            model.encode_image(images, normalize=True), out["image_features"]
        )
        torch.testing.assert_close(model.encode_text(texts, normalize=True), out["text_features"])
        only_text = model(text=texts)
        only_image = model(image=images)
        assert only_text["image_features"] is None and only_image["text_features"] is None
        torch.testing.assert_close(only_text["text_features"], out["text_features"])
        torch.testing.assert_close(only_image["image_features"], out["image_features"])
        logits_i, logits_t = model.get_logits(images, texts)
        torch.testing.assert_close(
            logits_i, out["logit_scale"] * out["image_features"] @ out["text_features"].T
        )
        torch.testing.assert_close(logits_t, logits_i.T)
        model.output_dict = False
        f_img, f_txt, scale = model(images, texts)
        torch.testing.assert_close(f_img, out["image_features"])


def test_forward_returns_the_loss_dict_whatever_the_inner_models_output_dict(tokenizer):
    """open_clip's create_model defaults to output_dict=False; the wrapper still returns the dict
    CDDSLoss takes, as the README's snippet uses it (output_dict=False opts into the tuple)."""
    tiny_config_dir()
    clip = open_clip.create_model(TINY_MODEL)
    assert not clip.output_dict
    images, texts = batch(tokenizer, 3)
    out = CDDSModel(clip, **HEAD_KW)(images, texts)
    assert isinstance(out, dict)
    assert set(CDDSLoss(backend="reference")(**out, output_dict=True)) == set(LOSS_KEYS)
    image_features, text_features, scale = CDDSModel(clip, **HEAD_KW, output_dict=False)(
        images, texts
    )
    assert image_features.shape == text_features.shape == (3, 32) and scale.dim() == 0


MODEL_INPUT_CASES = [
    (
        "image-size",
        dict(image=torch.randn(2, 3, 16, 16)),
        ValueError,
        r"image: expected shape \[B, 3, 32, 32\] \(the image tower's input; open_clip's preprocess "
        r"transform makes it\), got \[2, 3, 16, 16\]",
    ),
    (
        "image-channels",
        dict(image=torch.randn(2, 1, 32, 32)),
        ValueError,
        r"image: expected shape \[B, 3, 32, 32\].*got \[2, 1, 32, 32\]",
    ),
    (
        "image-ndim",
        dict(image=torch.randn(3, 32, 32)),
        ValueError,
        r"image: expected 4 dimensions, got shape \[3, 32, 32\]",
    ),
    (
        "image-uint8",
        dict(image=torch.zeros(2, 3, 32, 32, dtype=torch.uint8)),
        TypeError,
        "image: expected dtype float32, bfloat16, float16 or float64, got torch.uint8",
    ),
    (
        "image-float64",
        dict(image=torch.randn(2, 3, 32, 32, dtype=torch.float64)),
        TypeError,
        "image: expected dtype torch.float32 .*got torch.float64",
    ),
    (
        "text-float",
        dict(text=torch.ones(2, 16)),
        TypeError,
        "text: expected token ids of dtype torch.int64 or torch.int32 .*got torch.float32",
    ),
    (
        "text-too-long",
        dict(text=torch.ones(2, 20, dtype=torch.long)),
        ValueError,
        r"text: expected shape \[B, L\] with 1 <= L <= context_length = 16, got \[2, 20\]",
    ),
    (
        "text-1d",
        dict(text=torch.ones(16, dtype=torch.long)),
        ValueError,
        r"text: expected shape \[B, L\] .*got \[16\]",
    ),
    (
        "text-list",
        dict(text=["a red square", "a blue circle"]),
        TypeError,
        "text: expected a torch.Tensor of token ids, got list",
    ),
    (
        "batch",
        dict(text=torch.ones(3, 16, dtype=torch.long)),
        ValueError,
        r"text: expected batch size 2 \(from image\), got shape \[3, 16\]",
    ),
]


@pytest.mark.parametrize(
    "change,exc,match", [pytest.param(*c[1:], id=c[0]) for c in MODEL_INPUT_CASES]
)
def test_model_refuses_bad_inputs_before_any_compute(tokenizer, change, exc, match):
    model = CDDSModel(make_clip(), **HEAD_KW)
    calls = []
    model.clip.visual.conv1.register_forward_pre_hook(lambda *_: calls.append("image"))
    model.clip.token_embedding.register_forward_pre_hook(lambda *_: calls.append("text"))
    images, texts = batch(tokenizer, 2)
    inputs = {"image": images, "text": texts, **change}
    with pytest.raises(exc, match=match):
        model(**inputs)
    assert calls == []
    if "image" in change:
        with pytest.raises(exc, match=match):
            model.encode_image(change["image"])
    if "text" in change and "batch" not in match:
        with pytest.raises(exc, match=match):
            model.encode_text(change["text"])


def test_tokens_match_open_clip_pooling(tokenizer):
    """Our image tokens average to the tower's 'avg' pooled output; our text token at EOT is
    exactly CLIP.encode_text's pooled output."""
    clip = make_clip().eval()
    model = CDDSModel(clip, **HEAD_KW).eval()
    images, texts = batch(tokenizer, 3)
    with torch.no_grad():
        tokens = model.image_tokens(images)
        clip.visual.pool_type = "avg"
        torch.testing.assert_close(tokens.mean(1), clip.visual(images), rtol=1e-5, atol=1e-5)
        text_tokens, mask = model.text_tokens(texts)
        eot = texts.argmax(-1)
        pooled = text_tokens[torch.arange(3), eot]
        torch.testing.assert_close(pooled, clip.encode_text(texts), rtol=1e-5, atol=1e-5)


def test_custom_text_clip(tokenizer):
    clip = make_clip(force_custom_text=True).eval()
    assert type(clip).__name__ == "CustomTextCLIP"
    model = CDDSModel(clip, **HEAD_KW).eval()
    images, texts = batch(tokenizer, 3)
    with torch.no_grad():
        text_tokens, mask = model.text_tokens(texts)
        eot = texts.argmax(-1)
        torch.testing.assert_close(
            text_tokens[torch.arange(3), eot], clip.encode_text(texts), rtol=1e-5, atol=1e-5
        )
        out = model(images, texts)
    assert out["text_features"].shape == (3, 32)
    assert model.context_length == 16 and model.text is clip.text


def test_loss_backward_reaches_every_parameter(tokenizer):
    torch.manual_seed(0)
    model = CDDSModel(make_clip(), **HEAD_KW).train()
    loss = CDDSLoss(backend="reference")
    images, texts = batch(tokenizer, 4)
    terms = loss(**model(images, texts), output_dict=True)
    assert set(terms) == set(LOSS_KEYS)
    assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())
    sum(terms.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    zero = [n for n, p in model.named_parameters() if not bool(p.grad.abs().sum() > 0)]
    assert not zero
    for name in (
        "clip.logit_scale",
        "head.alpha_image",
        "head.alpha_text",
        "head.w_s_image",
        "head.w_m_text",
        "clip.visual.proj",
        "clip.text_projection",
        "head.image_decoupler.encoder.0.qkv.weight",
    ):
        assert dict(model.named_parameters())[name].grad is not None, name


def test_batch_replicated_vectors_give_the_parameter_gradient(tokenizer):
    """[B, D] expanded vectors: the loss's row mean sends exactly dL/dparam to the parameter,
    also when rows of other micro-batches are cached constants (open_clip's --accum-freq)."""
    torch.manual_seed(0)
    model = CDDSModel(make_clip(), **{**HEAD_KW, "sigma": 0.0, "z": 1})
    loss = CDDSLoss(backend="reference")
    images, texts = batch(tokenizer, 4)
    out = model(images, texts)
    plain = dict(out)
    for name in model.head.PARAM_NAMES:
        plain[name] = getattr(model.head, name)
    g_ref = torch.autograd.grad(
        sum(loss(**plain, output_dict=True).values()), model.head.alpha_text
    )[0]
    g_rep = torch.autograd.grad(sum(loss(**out, output_dict=True).values()), model.head.alpha_text)[
        0
    ]
    torch.testing.assert_close(g_rep, g_ref)

    # accumulation: two micro-batches of 2, the other one cached without grad
    grads = torch.zeros_like(model.head.w_s_image)
    with torch.no_grad():
        cached = [model(images[i : i + 2], texts[i : i + 2]) for i in (0, 2)]
    for j in range(2):
        cur = model(images[2 * j : 2 * j + 2], texts[2 * j : 2 * j + 2])
        scale = cur.pop("logit_scale")
        inputs = {
            k: torch.cat([cached[0][k] if j else cur[k], cur[k] if j else cached[1][k]])
            for k in cur
        }
        total = sum(loss(**inputs, logit_scale=scale, output_dict=True).values())
        grads += torch.autograd.grad(total, model.head.w_s_image)[0]
    g_full = torch.autograd.grad(sum(loss(**out, output_dict=True).values()), model.head.w_s_image)[
        0
    ]
    torch.testing.assert_close(grads, g_full, rtol=1e-4, atol=1e-6)


def test_trainer_attributes_and_controls(tokenizer):
    clip = make_clip()
    model = CDDSModel(clip, **HEAD_KW)
    assert model.logit_scale is clip.logit_scale and model.logit_bias is None
    assert model.visual is clip.visual and tuple(model.visual.image_size) == (32, 32)
    assert model.context_length == 16 and model.vocab_size == 49408
    assert model.transformer is clip.transformer and model.text_pool_type == "argmax"
    assert not hasattr(model, "module")  # open_clip's unwrap_model must not unwrap us
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        model.logit_scale.clamp_(0, math.log(100))  # what the trainer does after each step
    assert clip.logit_scale.item() == pytest.approx(math.log(100))
    model.set_grad_checkpointing(True)
    assert (
        model.head.image_decoupler.grad_checkpointing
        and model.head.text_decoupler.grad_checkpointing
    )
    assert clip.visual.transformer.grad_checkpointing and clip.transformer.grad_checkpointing
    images, texts = batch(tokenizer, 2)
    sum(CDDSLoss(backend="reference")(**model(images, texts), output_dict=True).values()).backward()
    assert model.head.image_decoupler.encoder[0].qkv.weight.grad is not None
    model.lock_image_tower()
    assert not any(p.requires_grad for p in clip.visual.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.lock_text_tower()
    assert not clip.token_embedding.weight.requires_grad
    assert "clip.positional_embedding" in model.no_weight_decay()


@pytest.mark.parametrize("precision", ["bf16", "pure_bf16"])
def test_head_follows_tower_dtype(tokenizer, precision):
    model = CDDSModel(make_clip(precision=precision), **HEAD_KW)
    assert model.head.alpha_image.dtype == torch.bfloat16
    assert model.head.image_decoupler.encoder[0].qkv.weight.dtype == torch.bfloat16
    images, texts = batch(tokenizer, 2)
    out = model(images.bfloat16(), texts)
    assert out["image_semantic"].dtype == torch.bfloat16
    terms = CDDSLoss(backend="reference")(**out, output_dict=True)
    sum(terms.values()).backward()
    assert all(torch.isfinite(t) for t in terms.values())
    # model.to(dtype), as with the trainer's pure precisions, keeps the head in step
    model32 = CDDSModel(make_clip(), **HEAD_KW).to(torch.bfloat16)
    assert model32.head.w_s_text.dtype == torch.bfloat16


def test_unsupported_towers_are_refused():
    tiny_config_dir()
    rn = open_clip.create_model(TINY_RESNET_MODEL)
    with pytest.raises(TypeError, match="ModifiedResNet"):
        CDDSModel(rn)
    vision = {
        "image_size": 32,
        "layers": 1,
        "width": 32,
        "patch_size": 8,
        "head_width": 16,
        "attentional_pool": True,
        "attn_pooler_queries": 4,
        "attn_pooler_heads": 2,
    }
    text = {"context_length": 16, "width": 32, "heads": 2, "layers": 1}
    with pytest.raises(ValueError, match="attentional pool"):
        CDDSModel(open_clip.model.CLIP(32, vision, text))
    with pytest.raises(TypeError, match="CLIP or CustomTextCLIP"):
        CDDSModel(torch.nn.Linear(2, 2))
    siglip_like = open_clip.create_model(TINY_MODEL, init_logit_bias=-10.0)
    with pytest.raises(ValueError, match="logit_bias"):
        CDDSModel(siglip_like)


def test_text_valid_mask_pool_types():
    text = torch.tensor([[5, 9, 3, 0, 0], [5, 4, 9, 7, 0], [1, 1, 1, 1, 1]])
    assert text_valid_mask(text, "argmax").sum(1).tolist() == [2, 3, 1]
    assert text_valid_mask(text, "eos", eos_id=3).sum(1).tolist() == [3, 5, 5]
    assert text_valid_mask(text, "last", pad_id=0).sum(1).tolist() == [3, 4, 5]
    assert text_valid_mask(torch.zeros(1, 4, dtype=torch.long), "last").tolist() == [
        [True, False, False, False]
    ]
    with pytest.raises(ValueError, match="pool_type"):
        text_valid_mask(text, "mean")


def test_wrapper_prefixes_are_stripped_in_any_nesting():
    from cdds_fast.open_clip.checkpoint import strip_state_dict_prefixes

    w = torch.zeros(1)
    keys = ["module.a", "_orig_mod.b", "module._orig_mod.c", "_orig_mod.module.d", "e.module.f"]
    out = strip_state_dict_prefixes(dict.fromkeys(keys, w))
    assert list(out) == ["a", "b", "c", "d", "e.module.f"]


def test_checkpoint_round_trip_with_ddp_prefixes(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = CDDSModel(make_clip(), **HEAD_KW).eval()
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "x", "state_dict": sd}, path)
    loaded = CDDSModel.from_checkpoint(path, TINY_MODEL, heads=HEADS, z=2)
    assert loaded.cdds_config["n_enc"] == 1 and loaded.cdds_config["n_dec"] == 2  # from the keys
    assert not loaded.training
    images, texts = batch(tokenizer, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))
        fresh = load_cdds_checkpoint(CDDSModel(make_clip(), **HEAD_KW).eval(), path)
        torch.testing.assert_close(fresh.encode_text(texts), model.encode_text(texts))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes(tmp_path):
    """Real 2-process gloo group: CDDSLoss's contrastive terms over the gathered batch equal the
    single-process values; their gradients follow open_clip's ClipLoss semantics; a DDP-wrapped
    CDDSModel gives every parameter a gradient over two steps (no unused-parameter error), also
    with the reference backend's relation part checkpointed in one-pair chunks."""
    import torch.multiprocessing as mp

    tiny_config_dir()
    mp.spawn(ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key, vals in report["loss"].items():
            assert vals["ddp"] == pytest.approx(vals["single"], rel=1e-5, abs=1e-6), key
        for key, err in report["grads"].items():
            assert err < 1e-5, (key, err)
        for run in ("ddp_model", "ddp_model_chunked"):
            assert report[run]["missing"] == [], run
            assert report[run]["finite"], run
        # the same init, batches and noise: chunking the relation part changes rounding only
        chunked, whole = report["ddp_model_chunked"]["grad_norm"], report["ddp_model"]["grad_norm"]
        assert chunked == pytest.approx(whole, rel=1e-5)


def test_loss_ignores_the_trainers_autocast(tokenizer):
    """open_clip calls the loss inside autocast; CDDSLoss computes in its own precision."""
    torch.manual_seed(0)
    model = CDDSModel(make_clip(), **HEAD_KW).eval()
    images, texts = batch(tokenizer, 3)
    with torch.no_grad():
        out = model(images, texts)
    out = {
        k: (v.bfloat16() if k.endswith(("_tokens", "_semantic", "_modality")) else v)
        for k, v in out.items()
    }
    loss = CDDSLoss(backend="reference")
    plain = loss(**out, output_dict=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss(**out, output_dict=True)
    for key in LOSS_KEYS:
        assert auto[key].dtype == torch.float32
        torch.testing.assert_close(auto[key], plain[key], rtol=0, atol=0)
