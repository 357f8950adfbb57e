"""Independent, minimal re-implementation of the published tokenizers, for tests only.

Written from a reading of LlamaGen ``tokenizer/tokenizer_image/vq_model.py`` (VQModel) and MAR ``models/vae.py``
(LDM AutoencoderKL), in a plain functional style: the forward passes read tensors straight out of a published-layout
state dict (no nn.Module), attention is the originals' bmm/softmax, and the key sets are enumerated the way the
originals build their modules (MAR places attention by ``curr_res in attn_resolutions`` at a nominal resolution).

    keys = llamagen_vq_keys(ch=128, ch_mult=(1, 1, 2, 2, 4), z_channels=256, codebook_size=16384, embed_dim=8)
    sd = random_state_dict(keys, seed=0)
    codes = vq_encode(sd, images); images = vq_decode(sd, codes)
    keys = mar_kl_keys(ch=128, ch_mult=(1, 1, 2, 2, 4), embed_dim=16, resolution=256)
    mean = kl_encode(sd, images); images = kl_decode(sd, mean)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------ key sets


def _conv(keys: dict, name: str, cout: int, cin: int, k: int) -> None:
    keys[f"{name}.weight"] = (cout, cin, k, k)
    keys[f"{name}.bias"] = (cout,)


def _norm(keys: dict, name: str, c: int) -> None:
    keys[f"{name}.weight"] = (c,)
    keys[f"{name}.bias"] = (c,)


def _res(keys: dict, name: str, cin: int, cout: int) -> None:
    _norm(keys, f"{name}.norm1", cin)
    _conv(keys, f"{name}.conv1", cout, cin, 3)
    _norm(keys, f"{name}.norm2", cout)
    _conv(keys, f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(keys, f"{name}.nin_shortcut", cout, cin, 1)


def _attn(keys: dict, name: str, c: int) -> None:
    _norm(keys, f"{name}.norm", c)
    for m in ("q", "k", "v", "proj_out"):
        _conv(keys, f"{name}.{m}", c, c, 1)


def llamagen_vq_keys(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, codebook_size=16384,
                     embed_dim=8, in_channels=3, usage=65536) -> dict:
    """Key -> shape of LlamaGen's VQModel state dict (attention at the lowest level of encoder and decoder)."""
    keys: dict = {}
    n = len(ch_mult)
    _conv(keys, "encoder.conv_in", ch, in_channels, 3)
    block_in = ch
    for lvl in range(n):
        block_out = ch * ch_mult[lvl]
        for j in range(num_res_blocks):
            _res(keys, f"encoder.conv_blocks.{lvl}.res.{j}", block_in, block_out)
            block_in = block_out
            if lvl == n - 1:
                _attn(keys, f"encoder.conv_blocks.{lvl}.attn.{j}", block_in)
        if lvl != n - 1:
            _conv(keys, f"encoder.conv_blocks.{lvl}.downsample.conv", block_in, block_in, 3)
    _res(keys, "encoder.mid.0", block_in, block_in)
    _attn(keys, "encoder.mid.1", block_in)
    _res(keys, "encoder.mid.2", block_in, block_in)
    _norm(keys, "encoder.norm_out", block_in)
    _conv(keys, "encoder.conv_out", z_channels, block_in, 3)
    block_in = ch * ch_mult[-1]
    _conv(keys, "decoder.conv_in", block_in, z_channels, 3)
    _res(keys, "decoder.mid.0", block_in, block_in)
    _attn(keys, "decoder.mid.1", block_in)
    _res(keys, "decoder.mid.2", block_in, block_in)
    for k, lvl in enumerate(reversed(range(n))):
        block_out = ch * ch_mult[lvl]
        for j in range(num_res_blocks + 1):
            _res(keys, f"decoder.conv_blocks.{k}.res.{j}", block_in, block_out)
            block_in = block_out
            if lvl == n - 1:
                _attn(keys, f"decoder.conv_blocks.{k}.attn.{j}", block_in)
        if lvl != 0:
            _conv(keys, f"decoder.conv_blocks.{k}.upsample.conv", block_in, block_in, 3)
    _norm(keys, "decoder.norm_out", block_in)
    _conv(keys, "decoder.conv_out", in_channels, block_in, 3)
    keys["quantize.embedding.weight"] = (codebook_size, embed_dim)
    keys["quantize.codebook_used"] = (usage,)
    _conv(keys, "quant_conv", embed_dim, z_channels, 1)
    _conv(keys, "post_quant_conv", z_channels, embed_dim, 1)
    return keys


def mar_kl_keys(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, embed_dim=16, resolution=256,
                enc_attn_resolutions=(16,), dec_attn_resolutions=(), in_channels=3) -> dict:
    """Key -> shape of MAR's AutoencoderKL(embed_dim, ch_mult) (encoder z_channels = embed_dim, double_z)."""
    keys: dict = {}
    n = len(ch_mult)
    _conv(keys, "encoder.conv_in", ch, in_channels, 3)
    res, block_in = resolution, ch
    for lvl in range(n):
        block_out = ch * ch_mult[lvl]
        for j in range(num_res_blocks):
            _res(keys, f"encoder.down.{lvl}.block.{j}", block_in, block_out)
            block_in = block_out
            if res in enc_attn_resolutions:
                _attn(keys, f"encoder.down.{lvl}.attn.{j}", block_in)
        if lvl != n - 1:
            _conv(keys, f"encoder.down.{lvl}.downsample.conv", block_in, block_in, 3)
            res //= 2
    for name, fn in (("block_1", _res), ("attn_1", _attn), ("block_2", _res)):
        fn(keys, f"encoder.mid.{name}", *((block_in, block_in) if fn is _res else (block_in,)))
    _norm(keys, "encoder.norm_out", block_in)
    _conv(keys, "encoder.conv_out", 2 * embed_dim, block_in, 3)
    block_in = ch * ch_mult[-1]
    res = resolution // 2 ** (n - 1)
    _conv(keys, "decoder.conv_in", block_in, embed_dim, 3)
    for name, fn in (("block_1", _res), ("attn_1", _attn), ("block_2", _res)):
        fn(keys, f"decoder.mid.{name}", *((block_in, block_in) if fn is _res else (block_in,)))
    for lvl in reversed(range(n)):
        block_out = ch * ch_mult[lvl]
        for j in range(num_res_blocks + 1):
            _res(keys, f"decoder.up.{lvl}.block.{j}", block_in, block_out)
            block_in = block_out
            if res in dec_attn_resolutions:
                _attn(keys, f"decoder.up.{lvl}.attn.{j}", block_in)
        if lvl != 0:
            _conv(keys, f"decoder.up.{lvl}.upsample.conv", block_in, block_in, 3)
            res *= 2
    _norm(keys, "decoder.norm_out", block_in)
    _conv(keys, "decoder.conv_out", in_channels, block_in, 3)
    _conv(keys, "quant_conv", 2 * embed_dim, 2 * embed_dim, 1)
    _conv(keys, "post_quant_conv", embed_dim, embed_dim, 1)
    return keys


def random_state_dict(keys: dict, seed: int = 0) -> dict:
    """Random weights for a key set (norm affines around 1 / 0, convs ~ fan-in scaled, codes uniform)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in sorted(keys.items()):
        if k.endswith("codebook_used"):
            sd[k] = torch.randint(0, 16, shape, generator=g).float()
        elif ".norm" in k and k.endswith(".weight"):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 4:
            sd[k] = torch.randn(shape, generator=g) / (shape[1] * shape[2] * shape[3]) ** 0.5
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    return sd

# ------------------------------------------------------------------------------------------ forward passes


def _c(sd, name, x, stride=1, padding=None):
    w = sd[f"{name}.weight"]
    return F.conv2d(x, w, sd[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)


def _swish(x):
    return x * torch.sigmoid(x)


def _gn(sd, name, x):
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _resblock(sd, name, x):
    h = _c(sd, f"{name}.conv1", _swish(_gn(sd, f"{name}.norm1", x)))
    h = _c(sd, f"{name}.conv2", _swish(_gn(sd, f"{name}.norm2", h)))
    if f"{name}.nin_shortcut.weight" in sd:
        x = _c(sd, f"{name}.nin_shortcut", x)
    return x + h


def _attnblock(sd, name, x):
    b, c, hh, ww = x.shape
    h = _gn(sd, f"{name}.norm", x)
    q = _c(sd, f"{name}.q", h).reshape(b, c, hh * ww).permute(0, 2, 1)
    k = _c(sd, f"{name}.k", h).reshape(b, c, hh * ww)
    v = _c(sd, f"{name}.v", h).reshape(b, c, hh * ww)
    w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
    out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _c(sd, f"{name}.proj_out", out)


def _has(sd, prefix):
    return any(k.startswith(prefix) for k in sd)


def _level(sd, prefix, blocks_name, x, resample):
    j = 0
    while _has(sd, f"{prefix}.{blocks_name}.{j}."):
        x = _resblock(sd, f"{prefix}.{blocks_name}.{j}", x)
        if _has(sd, f"{prefix}.attn.{j}."):
            x = _attnblock(sd, f"{prefix}.attn.{j}", x)
        j += 1
    if resample == "down" and _has(sd, f"{prefix}.downsample."):
        x = _c(sd, f"{prefix}.downsample.conv", F.pad(x, (0, 1, 0, 1)), stride=2, padding=0)
    if resample == "up" and _has(sd, f"{prefix}.upsample."):
        x = _c(sd, f"{prefix}.upsample.conv", F.interpolate(x, scale_factor=2.0, mode="nearest"))
    return x


def _n_levels(sd, prefix):
    n = 0
    while _has(sd, f"{prefix}.{n}."):
        n += 1
    return n


def _tail(sd, prefix, x):
    return _c(sd, f"{prefix}.conv_out", _swish(_gn(sd, f"{prefix}.norm_out", x)))


def _vq_encoder(sd, x):
    x = _c(sd, "encoder.conv_in", x)
    for lvl in range(_n_levels(sd, "encoder.conv_blocks")):
        x = _level(sd, f"encoder.conv_blocks.{lvl}", "res", x, "down")
    x = _resblock(sd, "encoder.mid.2", _attnblock(sd, "encoder.mid.1", _resblock(sd, "encoder.mid.0", x)))
    return _tail(sd, "encoder", x)


def _vq_decoder(sd, z):
    x = _c(sd, "decoder.conv_in", z)
    x = _resblock(sd, "decoder.mid.2", _attnblock(sd, "decoder.mid.1", _resblock(sd, "decoder.mid.0", x)))
    for k in range(_n_levels(sd, "decoder.conv_blocks")):
        x = _level(sd, f"decoder.conv_blocks.{k}", "res", x, "up")
    return _tail(sd, "decoder", x)


def _normalized_codebook(sd):
    return F.normalize(sd["quantize.embedding.weight"], p=2, dim=-1)


def vq_encode(sd, x):
    """LlamaGen VQModel.encode -> min_encoding_indices, reshaped to (B, h, w)."""
    h = _c(sd, "quant_conv", _vq_encoder(sd, x))
    b, c, hh, ww = h.shape
    z = F.normalize(h.permute(0, 2, 3, 1).reshape(-1, c), p=2, dim=-1)
    e = _normalized_codebook(sd)
    d = (z ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * torch.einsum("bd,dn->bn", z, e.t())
    return d.argmin(1).reshape(b, hh, ww)


def vq_decode(sd, codes):
    """LlamaGen VQModel.decode_code(codes, shape=(B, C, h, w))."""
    q = _normalized_codebook(sd)[codes].permute(0, 3, 1, 2)
    return _vq_decoder(sd, _c(sd, "post_quant_conv", q))


def kl_moments(sd, x):
    x = _c(sd, "encoder.conv_in", x)
    for lvl in range(_n_levels(sd, "encoder.down")):
        x = _level(sd, f"encoder.down.{lvl}", "block", x, "down")
    x = _resblock(sd, "encoder.mid.block_2",
                  _attnblock(sd, "encoder.mid.attn_1", _resblock(sd, "encoder.mid.block_1", x)))
    return _c(sd, "quant_conv", _tail(sd, "encoder", x))


def kl_encode(sd, x):
    """MAR AutoencoderKL.encode(x).mean (= mode())."""
    return torch.chunk(kl_moments(sd, x), 2, dim=1)[0]


def kl_decode(sd, z):
    x = _c(sd, "decoder.conv_in", _c(sd, "post_quant_conv", z))
    x = _resblock(sd, "decoder.mid.block_2",
                  _attnblock(sd, "decoder.mid.attn_1", _resblock(sd, "decoder.mid.block_1", x)))
    for lvl in reversed(range(_n_levels(sd, "decoder.up"))):
        x = _level(sd, f"decoder.up.{lvl}", "block", x, "up")
    return _tail(sd, "decoder", x)
