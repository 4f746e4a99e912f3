"""`jaxchat train --profile A:B`: a jax.profiler trace of steps A..B-1 of a real run, written into the run directory
(<run>/profile/), with the optimized HLO of the step beside it so kernels map back to the model's named scopes.
Steps are numbered as the progress line numbers them (step N is the update that makes the state of step N).
View the trace in TensorBoard's profile plugin (`pip install tensorboard tensorboard-plugin-profile`, then
`tensorboard --logdir RUN/profile`), in xprof, or open the .trace.json.gz in https://ui.perfetto.dev."""

from __future__ import annotations

from pathlib import Path

import jax

from jaxchat.config import ConfigError


class ProfileWindow:
    """Starts the trace before step A runs and stops it once step B-1 has finished (its result fetched)."""

    def __init__(self, steps: tuple[int, int], run_dir: Path, start: int, total: int, log=print):
        a, b = steps
        if a <= start or b - 1 > total:
            raise ConfigError(f"--profile {a}:{b} traces steps {a}..{b - 1}, but this run executes steps "
                              f"{start + 1}..{total}: pick a range inside it")
        self.a, self.b, self.dir, self.log, self.active = a, b, Path(run_dir) / "profile", log, False

    def before(self, step: int, compiled=None) -> None:
        """Call with the number of the step about to run."""
        if step == self.a:
            self.dir.mkdir(parents=True, exist_ok=True)
            if compiled is not None:
                (self.dir / "step.hlo.txt").write_text(compiled.as_text())
            jax.profiler.start_trace(str(self.dir), create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, state) -> None:
        """Call with the number of the step that just ran and the state it made."""
        if self.active and step == self.b - 1:
            self.stop(state)

    def stop(self, state=None) -> None:
        if not self.active:
            return
        if state is not None:
            jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.active = False
        traces = sorted(self.dir.rglob("*.xplane.pb"))
        self.log(f"profile of steps {self.a}..{self.b - 1}: {traces[-1] if traces else self.dir}\n"
                 f"  view: tensorboard --logdir {self.dir} (needs tensorboard-plugin-profile), or open the "
                 f".trace.json.gz beside it in https://ui.perfetto.dev")
