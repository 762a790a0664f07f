"""Sweeps: run a sweep file's points and gather their results into one Table-1-shaped table.

  python -m easunet_jax.sweep --sweep=configs/sweep_table1.py[:ARG] --workdir=W [--seeds=3]
      [--devices_per_run=1] [--dry_run] [--config.<field>=<value> ...]

A sweep file defines `sweep(add)` (flax-examples style) and calls `add(name, config, title, **fields)`
once per variant: a config file (`:ARG` of the sweep is passed on to it, e.g. `:demo`) and field overrides
such as `**{'model.eca': False}`. Each variant runs with seeds 0..N-1; each such point trains and then
evaluates as its own `main.py` process in W/<variant>_seed<s>, with every `--config.*` flag of the command
line passed on.
Points run one at a time on CPU and one per group of `--devices_per_run` GPUs at once where there are more.
A point whose evaluation of the same config exists is skipped (an evaluation run by hand of an unfinished
point counts too); an unfinished one resumes from its newest checkpoint (main.py does that). A failed
point, or one whose training a signal stopped (main.py exits 128 + the signal), does not stop the others;
it is named in the table and the sweep exits non-zero at the end. SIGTERM, Ctrl-C or SIGHUP stops the
sweep: the running points save a checkpoint and stop, and the same command goes on from there. The points
share main.py's compilation cache (W/.jax_cache).

Every point sees the same subjects: the sweep writes W/splits.json once (unless data.split_file is given),
and it builds their one slice store (W/slices) before any run starts, so that no two processes ever write
it.
Results: W/table.md and W/table.csv (per variant and cartilage, mean ± sample std over seeds of each run's
test-set mean, 2D per cartilage slice as the paper's Table 1 and 3D per volume) and W/dice.png.

Modules: `run` loads the sweep file and runs it, `launch` runs the points as `main.py` processes on the
device groups, `table` tabulates and plots their evaluations; `__main__` is the command line.
"""
