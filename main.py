"""A checkout's command line, `python main.py --config=configs/eas.py ...`: `python -m easunet_jax`
(easunet_jax/__main__.py), which an installed easunet_jax runs from anywhere."""

import runpy

runpy.run_module('easunet_jax', run_name='__main__', alter_sys=True)
