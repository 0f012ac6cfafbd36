"""One modulated norm per conditioner kind against an independent numpy reference, written from
the equations of the README and DESIGN.md (not from the model code):

    x_i = h_i / rms(h_i);  [dg_i; db_i] = C(x_i, V);  ViLN(h_i, V) = (g + dg_i) * x_i + db_i

- attention: q_i = Wq x_i, K/V projected from V (group g of `kv_groups`), per head
  a_i = softmax(q_i K^T / sqrt(Dc) over the allowed keys) Vv, [dg; db] = Wo a_i + bo.
- mlp: [dg; db] = W2 gelu(W1 [x_i; masked_mean(V)] + b1) + b2.
- conv: as mlp, the summary being a ConvMixer block over each frame's token grid
  (x + LN(gelu(depthwise(x))), then LN(gelu(pointwise(x)))) before the masked mean.
- gate tanh: deltas x tanh(alpha); delta_clip c: c tanh(delta / c).

Text token t sees the valid visual tokens of the items whose placeholder is at or before t;
tokens that see none get zero deltas. GELU is the tanh form (Flax's `nn.gelu`; the design says
only "gelu"). Every parameter is random (the zero-initialised last projections included).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lavi_jax.models.lavi import count_items_so_far
from lavi_jax.models.viln import ViLN, ViLNContext, token_conditioning
from lavi_jax.models.visual import VisualTokens
from tests.helpers import tiny_config

T = 10
FRAMES = 3  # frame slots per row
# Row 0: item 0 = frames 0 and 1 (placeholder at 3), item 1 = frame 2 (placeholder at 6).
# Row 1: item 0 = frame 0 (placeholder at 5); frames 1, 2 are padding.
PLACEHOLDERS = [(3, 6), (5,)]
FRAME_ITEM = np.array([[0, 0, 1], [0, 0, 0]])
FRAME_VALID = np.array([[True, True, True], [True, False, False]])

CASES = {
    'attention': {'viln.conditioner': 'attention', 'viln.kv_groups': 2},
    'attention_gate_clip': {'viln.conditioner': 'attention', 'viln.gate': 'tanh',
                            'viln.delta_clip': 0.3},
    'mlp': {'viln.conditioner': 'mlp'},
    'conv': {'viln.conditioner': 'conv', 'viln.kv_groups': 2},
}


def gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def allowed_tokens(frame_side):
  """(B, T, N): token t sees frame f's tokens iff f is valid and its item's placeholder <= t."""
  per_frame = np.zeros((2, T, FRAMES), bool)
  for b, places in enumerate(PLACEHOLDERS):
    for f in range(FRAMES):
      if FRAME_VALID[b, f] and FRAME_ITEM[b, f] < len(places):
        per_frame[b, places[FRAME_ITEM[b, f]]:, f] = True
  return np.repeat(per_frame, frame_side ** 2, axis=2)


def conv_mixer(v, p, group, side, kernel):
  """v (B, N, C), N = FRAMES * side^2 -> ConvMixer of each frame's side x side grid, (B, N, C)."""
  b, n, c = v.shape
  grid = v.reshape(b, FRAMES, side, side, c)
  w = p['depthwise_kernel'][group]  # (k, k, C)
  r = kernel // 2
  padded = np.pad(grid, ((0, 0), (0, 0), (r, r), (r, r), (0, 0)))
  conv = np.zeros_like(grid)
  for i in range(kernel):
    for j in range(kernel):
      conv += padded[:, :, i:i + side, j:j + side] * w[i, j]
  conv += p['depthwise_bias'][group]
  at = lambda q: {k: a[group] for k, a in q.items()}
  grid = grid + layer_norm(gelu(conv), at(p['norm1']))
  x = grid.reshape(b, n, c) @ p['pointwise']['kernel'][group] + p['pointwise']['bias'][group]
  return layer_norm(gelu(x), at(p['norm2']))


def reference(cfg, params, memory_params, h, v, allowed, group):
  """The modulated norm of h (B, T, D) given visual tokens v (B, N, C), in float64."""
  viln = cfg.viln
  x = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + cfg.llm.rms_norm_eps)
  cp = params['conditioner']
  sees = allowed.any(-1)
  if viln.conditioner == 'attention':
    q = np.einsum('btd,dhe->bthe', x, cp['q_proj']['kernel'])
    kv = {name: np.einsum('bnc,che->bnhe', v, memory_params[f'{name}_proj']['kernel'][:, group])
          + memory_params[f'{name}_proj']['bias'][group] for name in ('k', 'v')}
    scores = np.einsum('bthe,bnhe->bhtn', q, kv['k']) / np.sqrt(viln.head_dim)
    scores = np.where(allowed[:, None], scores, -np.inf)
    scores -= np.where(sees[:, None, :, None], scores.max(-1, keepdims=True), 0)
    weights = np.exp(scores)
    weights /= np.maximum(weights.sum(-1, keepdims=True), 1e-30)
    a = np.einsum('bhtn,bnhe->bthe', weights, kv['v'])
    delta = np.einsum('bthe,hesd->btsd', a, cp['o_proj']['kernel']) + cp['o_proj']['bias']
  else:
    if viln.conditioner == 'conv':
      v = conv_mixer(v, memory_params['conv_mixer'], group, cfg.vision.image_size
                     // cfg.vision.patch_size, viln.conv_kernel)
    count = allowed.sum(-1, keepdims=True)
    summary = np.einsum('btn,bnc->btc', allowed, v) / np.maximum(count, 1)
    hidden = gelu(np.concatenate([x, summary], -1) @ cp['fc1']['kernel'] + cp['fc1']['bias'])
    delta = np.einsum('btm,msd->btsd', hidden, cp['fc2']['kernel']) + cp['fc2']['bias']
  if viln.gate == 'tanh':
    delta = delta * np.tanh(cp['gate'])
  if viln.delta_clip > 0:
    delta = viln.delta_clip * np.tanh(delta / viln.delta_clip)
  delta = np.where(sees[..., None, None], delta, 0)
  dg, db = delta[..., 0, :], delta[..., 1, :]
  return (params['scale'] + dg) * x + db


def randomise(tree, rng):
  """Every leaf random: norm scales around 1, the tanh gates away from 0."""
  def fill(path, leaf):
    name = str(getattr(path[-1], 'key', ''))
    if name == 'gate':
      return np.full(leaf.shape, 0.7, np.float32)
    noise = rng.normal(0, 0.1, leaf.shape).astype(np.float32)
    return 1 + noise if name == 'scale' else noise
  return jax.tree_util.tree_map_with_path(fill, tree)


@pytest.mark.parametrize('case', list(CASES))
def test_modulated_norm_matches_numpy_reference(case):
  config = tiny_config(**CASES[case]).model
  cfg = ml_collections.FrozenConfigDict(config)
  rng = np.random.default_rng(0)
  side = cfg.vision.image_size // cfg.vision.patch_size
  p, c, d = side * side, cfg.projector.ctx_dim, cfg.llm.hidden_size
  n = FRAMES * p
  group = cfg.viln.kv_groups - 1
  ids = np.full((2, T), 7, np.int32)
  for b, places in enumerate(PLACEHOLDERS):
    ids[b, list(places)] = cfg.image_token_id
  table = rng.normal(0, 1, (2, n, c)).astype(np.float32)  # one group (row) per frame pool
  visual = VisualTokens(jnp.asarray(table), jnp.tile(jnp.arange(n), (2, 1)),
                        jnp.asarray(np.repeat(FRAME_VALID, p, 1)),
                        jnp.asarray(np.repeat(FRAME_ITEM, p, 1)), ((side, side),))
  h = jnp.asarray(rng.normal(0, 2, (2, T, d)).astype(np.float32))

  context, norm = ViLNContext(cfg), ViLN(cfg, True)
  memory_params = randomise(nn.unbox(context.init(jax.random.key(0), visual).get('params', {})),
                            rng)

  def cond_of(mp):
    return token_conditioning(context.apply({'params': mp}, visual),
                              count_items_so_far(jnp.asarray(ids), cfg))

  cond = cond_of(memory_params)
  params = randomise(nn.unbox(norm.init(jax.random.key(1), h, cond, group)['params']), rng)
  out = np.asarray(norm.apply({'params': params}, h, cond, group))

  f64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
  allowed = allowed_tokens(side)
  expected = reference(cfg, f64(params), f64(memory_params), np.asarray(h, np.float64),
                       table.astype(np.float64), allowed, group)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  # Tokens that see no visual item (before their row's first placeholder): the plain RMSNorm;
  # the others are modulated, by amounts far above the tolerance.
  blind = ~allowed.any(-1)
  assert blind[0, :3].all() and blind[1, :5].all() and not blind[:, -1].any()
  plain = np.asarray(norm.apply({'params': params}, h, None, group))
  np.testing.assert_array_equal(out[blind], plain[blind])
  assert np.abs(out - plain)[~blind].max(-1).min() > 1e-2
