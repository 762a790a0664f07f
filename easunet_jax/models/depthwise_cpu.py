"""The depthwise 3x3 kernel gradient of `depthwise_cpu.cc`, compiled on first use, called through jax.ffi.

The shared library is built with the machine's C++ compiler for its own CPU (-march=native) into
$EASUNET_CACHE (default ~/.cache/easunet_jax), keyed by the source, the compiler command, the jaxlib
version and the CPU's feature flags, so a second start loads it in milliseconds. Without a compiler
`available()` is False and `model.depthwise_impl='auto'` uses the pure-JAX kernel gradient instead.
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
_TARGET, _SYMBOL = 'easunet_depthwise_kernel_grad', 'EasunetDepthwiseKernelGrad'


def _cpu_flags() -> str:
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('flags'):
        return line
  except OSError:
    pass
  return platform.processor()


def _compile_command(compiler: str, output: pathlib.Path) -> list[str]:
  return [compiler, '-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w', f'-I{jax.ffi.include_dir()}',
          str(SOURCE), '-o', str(output)]


@functools.cache
def build() -> pathlib.Path:
  """The compiled library's path, compiling it first when the cache has none. Raises RuntimeError."""
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')
  if compiler is None:
    raise RuntimeError('no C++ compiler (g++, c++, clang++ or $CXX) found')
  cache = pathlib.Path(os.environ.get('EASUNET_CACHE', pathlib.Path.home() / '.cache' / 'easunet_jax'))
  key = hashlib.sha256('\n'.join([SOURCE.read_text(), ' '.join(_compile_command(compiler, pathlib.Path())),
                                  jax.__version__, _cpu_flags()]).encode()).hexdigest()[:16]
  library = cache / f'depthwise_cpu-{key}.so'
  if not library.exists():
    cache.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes starting together never load a partial file.
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
      partial = pathlib.Path(tmp) / library.name
      result = subprocess.run(_compile_command(compiler, partial), capture_output=True, text=True, check=False)
      if result.returncode:
        raise RuntimeError(f'compiling {SOURCE.name} failed: {result.stderr.strip()[-2000:]}')
      os.replace(partial, library)
  return library


@functools.cache
def _register() -> None:
  library = ctypes.cdll.LoadLibrary(str(build()))
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(getattr(library, _SYMBOL)), platform='cpu')


@functools.cache
def available() -> bool:
  """Whether the kernels compiled and registered; logs why not, once, when they did not."""
  try:
    _register()
  except (RuntimeError, OSError) as e:
    logging.warning('native depthwise kernel gradient unavailable, using the JAX one: %s', e)
    return False
  return True


def kernel_grad(x: jax.Array, g: jax.Array, dilation: int) -> jax.Array:
  """Kernel gradient (3, 3, C) of a depthwise 3x3 cross-correlation ('same' zero padding) of float32 NHWC
  `x`, given the gradient `g` of its output: dk[i + 1, j + 1, c] = sum_{n,h,w} x[n, h + i d, w + j d, c]
  g[n, h, w, c]."""
  _register()
  return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((3, 3, x.shape[-1]), jnp.float32))(
      x, g, dilation=np.int64(dilation))
