"""The depthwise 3x3 convolution as a Pallas GPU (Triton) kernel, forward and VJP.

On a GPU the network is bound by memory traffic, and the depthwise 3x3 (with the BatchNorm and
activation after it) is where most of the bytes go. `depthwise` computes the same function as
`layers.depthwise_shift` (NHWC x, kernel (3, 3, C) indexed by offset + 1, 'same' zero padding, any
dilation) as a kernel that reads each tile of the map once from memory, the floor for this op. Whether it
beats XLA's grouped convolution (`layers.depthwise_xla`) is for a GPU to measure; until then
`model.depthwise_impl='auto'` does not pick it.

- grid (channel blocks, column tiles, row tiles, batch); each program writes a (block_h, block_w,
  block_c) tile of the output and reads the nine shifted (block_h, block_w, block_c) windows of the
  input it needs straight from global memory (the overlap between taps and between neighbouring
  programs is served by the caches), multiplies and adds in float32 and stores in x's dtype;
- the halo is zero padding added by the wrapper (`jnp.pad` by the dilation, together with the round-up
  of the map to whole tiles and of the channels to whole channel blocks), so that every load is in
  bounds and needs no mask; Triton wants power-of-two block dimensions, which the round-up provides.
  The pad is one extra XLA pass over x (and a slice of the output where the map or channels were
  rounded up): masked loads (`pallas.triton.load(mask=...)`) could drop it once the kernel is measured;
- the VJP: the input gradient is the same kernel applied to the cotangent with the kernel mirrored (a
  second pallas_call of the same kernel function); the kernel gradient is a second Pallas kernel that
  reads each x window and the cotangent tile once and writes per-program float32 partial sums of the
  nine taps, reduced afterwards with `jnp.sum` in float32.

`interpret=True` (the argument, or the module-wide `INTERPRET`) runs the kernels in Pallas' interpreter,
on any backend: that is how the tests check them on CPU. Compiled, the kernels need a GPU backend.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Run the kernels in Pallas' interpreter (tests on CPU); `layers.resolve_depthwise_impl` reads it too.
INTERPRET = False

# Default tile of one program: rows x columns x channels. To be tuned on a GPU; powers of two (Triton).
BLOCK_H = 8
BLOCK_W = 16
BLOCK_C = 32
NUM_WARPS = 4


def live_taps(size: int, dilation: int) -> tuple[int, ...]:
  """Offsets (-1, 0, 1) whose dilated tap can touch the map; farther ones only see zero padding (every
  depthwise path skips those: `layers` uses this one too)."""
  return tuple(o for o in (-1, 0, 1) if abs(o) * dilation < size)


class _Plan(NamedTuple):
  """Tile (bh, bw, bc), tile counts (nh, nw, nc), halo and live taps of one call."""
  bh: int
  bw: int
  bc: int
  nh: int
  nw: int
  nc: int
  halo_h: int
  halo_w: int
  taps: tuple[tuple[int, int], ...]


def _plan(shape: tuple[int, int, int, int], dilation: int, blocks: tuple[int, int, int]) -> _Plan:
  """The tiling of one call.

  Blocks shrink to the next power of two of a small map (or channel count), so that an 8x8 map is not
  padded out to a whole default tile.
  """
  _, h, w, c = shape
  bh, bw, bc = (min(b, pl.next_power_of_2(s)) for b, s in zip(blocks, (h, w, c)))
  live_h, live_w = live_taps(h, dilation), live_taps(w, dilation)
  taps = tuple((i, j) for i in live_h for j in live_w)
  # Only an axis with an off-centre live tap needs a halo: a dilation past the map skips those taps.
  halo_h = dilation if len(live_h) > 1 else 0
  halo_w = dilation if len(live_w) > 1 else 0
  nh, nw, nc = pl.cdiv(h, bh), pl.cdiv(w, bw), pl.cdiv(c, bc)
  return _Plan(bh, bw, bc, nh, nw, nc, halo_h, halo_w, taps)


def _pad_input(x: jax.Array, p: _Plan) -> jax.Array:
  """Zero halo around the map, plus the round-up to whole tiles and channel blocks: one pad op."""
  _, h, w, c = x.shape
  rows, cols = p.nh * p.bh, p.nw * p.bw
  return jnp.pad(x, ((0, 0), (p.halo_h, rows - h + p.halo_h), (p.halo_w, cols - w + p.halo_w),
                     (0, p.nc * p.bc - c)))


def _grid(n: int, p: _Plan) -> tuple[int, int, int, int]:
  # Channel blocks vary fastest, then columns: programs that run side by side share their halo in L2.
  return (p.nc, p.nw, p.nh, n)


def _x_spec(x_padded: jax.Array, p: _Plan) -> pl.BlockSpec:
  # The whole padded map of one image and channel block: each program picks its windows with pl.ds.
  _, hp, wp, _ = x_padded.shape
  return pl.BlockSpec((None, hp, wp, p.bc), lambda c, j, i, b: (b, 0, 0, c))


def _tile_spec(p: _Plan) -> pl.BlockSpec:
  return pl.BlockSpec((None, p.bh, p.bw, p.bc), lambda c, j, i, b: (b, i, j, c))


def _window(x_ref, i: int, j: int, dilation: int, p: _Plan) -> jax.Array:
  """The (bh, bw, bc) input window that tap (i, j) multiplies into this program's output tile."""
  top = pl.program_id(2) * p.bh + p.halo_h + i * dilation
  left = pl.program_id(1) * p.bw + p.halo_w + j * dilation
  return x_ref[pl.ds(top, p.bh), pl.ds(left, p.bw), :].astype(jnp.float32)


def _stencil_kernel(x_ref, k_ref, o_ref, *, dilation: int, p: _Plan):
  """o = sum over live taps of the shifted x window times the tap's kernel row, in float32."""
  acc = jnp.zeros((p.bh, p.bw, p.bc), jnp.float32)
  for i, j in p.taps:
    acc += _window(x_ref, i, j, dilation, p) * k_ref[i + 1, j + 1, :]
  o_ref[...] = acc.astype(o_ref.dtype)


def _kernel_grad_kernel(x_ref, g_ref, o_ref, *, dilation: int, p: _Plan):
  """Row t of o: this program's float32 sum over its tile of (x window of tap t) * g."""
  g = g_ref[...].astype(jnp.float32)
  for t, (i, j) in enumerate(p.taps):
    o_ref[t, :] = jnp.sum(_window(x_ref, i, j, dilation, p) * g, axis=(0, 1))


def _compiler_params(interpret: bool):
  # Pin the Triton lowering (not Mosaic GPU); the interpreter takes no compiler parameters.
  return None if interpret else pltriton.CompilerParams(num_warps=NUM_WARPS)


def _stencil(x: jax.Array, kernel: jax.Array, dilation: int, config: tuple) -> jax.Array:
  """One pallas_call of `_stencil_kernel`: output of x's shape and dtype."""
  interpret, *blocks = config
  n, h, w, c = x.shape
  p = _plan(x.shape, dilation, tuple(blocks))
  xp = _pad_input(x, p)
  cp = p.nc * p.bc
  # Zero kernel rows for the padded channels; the kernel is read in float32 (it is only 9 x C).
  kp = jnp.pad(kernel.astype(jnp.float32), ((0, 0), (0, 0), (0, cp - c)))
  out = pl.pallas_call(
      functools.partial(_stencil_kernel, dilation=dilation, p=p),
      out_shape=jax.ShapeDtypeStruct((n, p.nh * p.bh, p.nw * p.bw, cp), x.dtype),
      grid=_grid(n, p),
      in_specs=[_x_spec(xp, p), pl.BlockSpec((3, 3, p.bc), lambda c, j, i, b: (0, 0, c))],
      out_specs=_tile_spec(p),
      interpret=interpret,
      compiler_params=_compiler_params(interpret),
      name='depthwise3x3',
  )(xp, kp)
  if out.shape != x.shape:
    out = out[:, :h, :w, :c]
  return out


def _kernel_grad(x: jax.Array, g: jax.Array, dilation: int, config: tuple) -> jax.Array:
  """dL/dkernel (3, 3, C) in float32: per-program partial sums (Pallas), reduced by jnp.sum."""
  interpret, *blocks = config
  n, h, w, c = x.shape
  p = _plan(x.shape, dilation, tuple(blocks))
  xp = _pad_input(x, p)
  # The cotangent needs no halo, only the round-up; its zeros there keep padded pixels out of the sums.
  gp = jnp.pad(g, ((0, 0), (0, p.nh * p.bh - h), (0, p.nw * p.bw - w),
                   (0, p.nc * p.bc - c)))
  num_taps = len(p.taps)
  partial = pl.pallas_call(
      functools.partial(_kernel_grad_kernel, dilation=dilation, p=p),
      out_shape=jax.ShapeDtypeStruct((n, p.nh, p.nw, num_taps, p.nc * p.bc), jnp.float32),
      grid=_grid(n, p),
      in_specs=[_x_spec(xp, p), _tile_spec(p)],
      out_specs=pl.BlockSpec((None, None, None, num_taps, p.bc), lambda c, j, i, b: (b, i, j, 0, c)),
      interpret=interpret,
      compiler_params=_compiler_params(interpret),
      name='depthwise3x3_kernel_grad',
  )(xp, gp)
  sums = jnp.sum(partial, axis=(0, 1, 2))[:, :c]
  dk = jnp.zeros((3, 3, c), jnp.float32)
  for t, (i, j) in enumerate(p.taps):
    dk = dk.at[i + 1, j + 1].set(sums[t])
  return dk


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x: jax.Array, kernel: jax.Array, dilation: int, config: tuple) -> jax.Array:
  return _stencil(x, kernel, dilation, config)


def _depthwise_fwd(x, kernel, dilation, config):
  return _stencil(x, kernel, dilation, config), (x, kernel)


def _depthwise_bwd(dilation, config, residuals, g):
  x, kernel = residuals
  # The input gradient is the same stencil on g with the kernel mirrored (offset o -> -o).
  dx = _stencil(g.astype(x.dtype), kernel[::-1, ::-1], dilation, config)
  # Kernel gradients sum over every pixel: float32 also when the network computes in bfloat16.
  return dx, _kernel_grad(x, g, dilation, config).astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise(x: jax.Array, kernel: jax.Array, dilation: int, *, interpret: bool | None = None,
              block_h: int = BLOCK_H, block_w: int = BLOCK_W, block_c: int = BLOCK_C) -> jax.Array:
  """Depthwise 3x3 cross-correlation, 'same' zero padding, as `layers.depthwise_shift`, in Pallas.

  x: (N, H, W, C); kernel: (3, 3, C) indexed by offset + 1; the output has x's dtype, the taps are
  summed in float32. Taps that only reach padding are skipped. interpret: run in Pallas' interpreter
  (None: the module's `INTERPRET`). block_*: a program's tile, powers of two.
  """
  for name, b in (('block_h', block_h), ('block_w', block_w), ('block_c', block_c)):
    if b < 1 or b & (b - 1):
      raise ValueError(f'{name} must be a power of two, got {b}')
  interpret = INTERPRET if interpret is None else interpret
  return _depthwise(x, kernel, int(dilation), (bool(interpret), block_h, block_w, block_c))

