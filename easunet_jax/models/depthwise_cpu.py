"""The CPU depthwise convolution of `depthwise_cpu.cc`, compiled on first use and called through jax.ffi.

The shared library is built with the machine's C++ compiler for its own CPU (-march=native) into
$EASUNET_CACHE (default $XDG_CACHE_HOME/easunet_jax, or ~/.cache/easunet_jax), keyed by the source, the
compiler command, the jax version and the CPU's feature flags, so a second start loads it in milliseconds.
Without a compiler `available()` is False and `model.depthwise_impl='auto'` uses the pure-JAX stencil
instead. The model uses it in training only (`layers.DepthwiseConv`), and builds it only there.
"""

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name('depthwise_cpu.cc')
_TARGETS = {'easunet_depthwise_forward': 'EasunetDepthwiseForward',
            'easunet_depthwise_kernel_grad': 'EasunetDepthwiseKernelGrad'}


def _cpu_flags() -> str:
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('flags'):
        return line
  except OSError:
    pass
  return platform.processor()


def _compile_command(compiler: str, output: pathlib.Path) -> list[str]:
  return [compiler, '-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w',
          f'-I{jax.ffi.include_dir()}', str(SOURCE), '-o', str(output)]


@functools.cache
def build() -> pathlib.Path:
  """The compiled library's path, compiling it first when the cache has none. Raises RuntimeError."""
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')
  if compiler is None:
    raise RuntimeError('no C++ compiler (g++, c++, clang++ or $CXX) found')
  cache = pathlib.Path(os.environ.get('EASUNET_CACHE') or pathlib.Path(
      os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache') / 'easunet_jax')
  key = hashlib.sha256('\n'.join([SOURCE.read_text(), ' '.join(_compile_command(compiler, pathlib.Path())),
                                  jax.__version__, _cpu_flags()]).encode()).hexdigest()[:16]
  library = cache / f'depthwise_cpu-{key}.so'
  if not library.exists():
    try:
      cache.mkdir(parents=True, exist_ok=True)
      building = tempfile.TemporaryDirectory(dir=cache)
    except OSError as e:
      raise RuntimeError(f'{cache}: cannot be written ({e.strerror}); EASUNET_CACHE names another folder for '
                         'the kernel') from None
    # Built under a temporary name and renamed: processes starting together never load a partial file.
    with building as tmp:
      partial = pathlib.Path(tmp) / library.name
      result = subprocess.run(_compile_command(compiler, partial), capture_output=True, text=True,
                              check=False)
      if result.returncode:
        raise RuntimeError(f'compiling {SOURCE.name} failed: {result.stderr.strip()[-2000:]}')
      os.replace(partial, library)
  return library


@functools.cache
def _register() -> None:
  library = ctypes.cdll.LoadLibrary(str(build()))
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')


@functools.cache
def available() -> bool:
  """Whether the kernels compiled and registered; logs why not, once, when they did not."""
  try:
    _register()
  except (RuntimeError, OSError) as e:
    logging.warning('native CPU depthwise convolution unavailable, using the JAX stencil: %s', e)
    return False
  return True


def _call(target: str, out_shape: tuple[int, ...], a: jax.Array, b: jax.Array, dilation: int) -> jax.Array:
  _register()
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, jnp.float32))(
      a, b, dilation=np.int64(dilation))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
  """Depthwise 3x3 cross-correlation of float32 NHWC `x` with `kernel` (3, 3, C), 'same' zero padding."""
  return _call('easunet_depthwise_forward', x.shape, x, kernel, dilation)


def _depthwise_fwd(x, kernel, dilation):
  return depthwise(x, kernel, dilation), (x, kernel)


def _depthwise_bwd(dilation, residuals, g):
  x, kernel = residuals
  # The input gradient is the same convolution of g with the kernel mirrored.
  dx = depthwise(g, kernel[::-1, ::-1], dilation)
  return dx, _call('easunet_depthwise_kernel_grad', kernel.shape, x, g, dilation)


depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)
