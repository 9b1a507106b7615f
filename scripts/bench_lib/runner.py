"""Runs the requested sections in order and assembles the JSON result and the Markdown report."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench_lib import inlp_bench, load_time, model_steps, pipeline, scaling, selection
from bench_lib.activations import Activations, extract
from bench_lib.measure import PeakRSS, Stats, machine_info
from bench_lib.report import SCHEMA_VERSION, Row, machine_lines, markdown_table
from bench_lib.workload import Workload, chat_workload, preset_config, random_workload

RANDOM_PREFIX = "random:"


def load_workload(flags, torch_options: dict[str, str]) -> Workload:
    if flags.model.startswith(RANDOM_PREFIX):
        preset = flags.model[len(RANDOM_PREFIX):]
        return random_workload(preset_config(preset), prompt_length=flags.random_prompt_length,
                               dtype=flags.dtype, torch_options=torch_options,
                               name=flags.model)
    return chat_workload(flags.model, prompts_dir=flags.prompts_dir, dtype=flags.dtype,
                         torch_options=torch_options)


class _Run:
    """State shared by the sections of one run: the workload and the training activations."""

    def __init__(self, flags, torch_options):
        self.flags = flags
        self.torch_options = torch_options
        self._workload = None
        self._activations = None
        self.rows: list[Row] = []

    @property
    def workload(self) -> Workload:
        if self._workload is None:
            start = time.time()
            self._workload = load_workload(self.flags, self.torch_options)
            self.load_s = time.time() - start
        return self._workload

    @property
    def loaded_workload(self) -> Workload | None:
        return self._workload

    @property
    def activations(self) -> Activations:
        if self._activations is None:
            f = self.flags
            memory = PeakRSS()
            acts = memory.track(lambda: extract(self.workload, f.inlp_prompts, f.extract_batch))
            self._activations = acts
            self.rows.append(Row(
                section="2 inlp", step=f"extract activations of {acts.features.shape[0]} prompts "
                f"(all EOI positions x layers), batches of {f.extract_batch}, one run",
                ours=Stats.of([acts.seconds]), compile_s=acts.compile_s,
                work=acts.features.shape[0], work_unit="prompt", memory={"ours": memory},
                details={"compilations": acts.n_compilations,
                         "shape": list(acts.features.shape)}))
        return self._activations

    def section(self, name: str) -> dict[str, Any]:
        """Runs one section, appending its rows; returns what the JSON records about it."""
        return getattr(self, f"_{name}")(self.flags)

    def _load(self, f) -> dict[str, Any]:
        rows, info = load_time.run(f.load_source, dtype=f.dtype, platform=f.platform,
                                   repeats=f.repeats)
        self.rows += rows
        return info

    def _capture(self, f) -> dict[str, Any]:
        w = self.workload
        self.rows += model_steps.capture_rows(w, w.mixed(f.capture_batch), warmup=f.warmup,
                                              repeats=f.repeats)
        return {}

    def _inlp(self, f) -> dict[str, Any]:
        rows, info = inlp_bench.run(self.activations, max_directions=f.inlp_max_directions,
                                    pairs=f.inlp_pairs, baseline_pairs=f.inlp_baseline_pairs,
                                    repeats=f.inlp_repeats)
        self.rows += rows
        return info

    def _selection(self, f) -> dict[str, Any]:
        rows, info = selection.selection_rows(
            self.workload, self.activations.dim_directions(), candidates=f.selection_candidates,
            baseline_candidates=f.selection_baseline_candidates, n_prompts=f.selection_prompts,
            mode=f.selection_mode, chunk=f.selection_chunk, batch_size=f.selection_batch,
            warmup=f.warmup, repeats=f.repeats, filters=f.selection_filters)
        self.rows += rows
        return info

    def _generation(self, f) -> dict[str, Any]:
        w = self.workload
        directions = self.activations.dim_directions()
        position, layer = directions.shape[0] - 1, directions.shape[1] // 2
        prompts = w.prompts("harmful_val", f.generation_batch)
        # From layer 1: layer 0's block input is the token embedding, the same at the EOI
        # positions of both classes, so its DiM direction is zero.
        sweep_layers = np.linspace(1, directions.shape[1] - 1, f.generation_sweep).round()
        sweep_layers = sweep_layers.astype(int).tolist()
        self.rows += model_steps.generation_rows(
            w, prompts, directions[position, layer], max_new_tokens=f.generation_new_tokens,
            warmup=f.warmup, repeats=f.repeats,
            sweep=directions[position, sweep_layers] if sweep_layers else None)
        if len(sweep_layers) >= 4:  # four variants at the depth the default study acts at
            shared_layer = round(0.7 * directions.shape[1])
            self.rows.append(model_steps.shared_prefill_row(
                w, prompts, directions[position, sweep_layers[:4]], shared_layer,
                max_new_tokens=f.generation_new_tokens, warmup=f.warmup, repeats=f.repeats))
        return {"ablated_direction": f"DiM at EOI position -1, layer {layer}",
                "sweep_directions": f"DiM at EOI position -1, layers {sweep_layers}"}

    def _pipeline(self, f) -> dict[str, Any]:
        rows, info = pipeline.run(
            f.pipeline_module, f.pipeline_flags, f.pipeline_timeout_s, twin=f.pipeline_twin,
            torch_options={key: self.torch_options[key] for key in ("attention", "device")},
            twin_select_sample=f.pipeline_twin_select_candidates)
        self.rows += rows
        return info

    def _scaling(self, f) -> dict[str, Any]:
        axes = {axis: scaling.parse_values(getattr(f, f"scaling_{axis}"))
                for axis in f.scaling_axes}
        records = scaling.run(axes, scaling.ScalingPoint(), new_tokens=f.scaling_new_tokens,
                              warmup=f.warmup, repeats=f.scaling_repeats, dtype=f.dtype,
                              torch_options=self.torch_options)
        plot_path = f.plot or (str(Path(f.out).with_suffix(".png")) if f.out else "")
        if plot_path:
            scaling.plot(records, plot_path, f"refusal_jax vs transformers, random Llama models "
                         f"({f.dtype}, {f.platform})")
        return {"base_point": dataclasses.asdict(scaling.ScalingPoint()), "records": records,
                "plot": plot_path or None}


def run_all(flags, settings: dict[str, Any]) -> dict[str, Any]:
    device = "cuda" if flags.platform == "gpu" else "cpu"
    torch_options = {"attention": flags.torch_attention, "dtype": flags.dtype, "device": device}
    machine = machine_info()
    run = _Run(flags, torch_options)
    sections: dict[str, Any] = {}
    with torch.no_grad():
        for name in flags.sections:
            start = time.time()
            info = run.section(name)
            sections[name] = {"status": "ok", **info, "wall_s": round(time.time() - start, 1)}
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    model = None
    if run.loaded_workload is not None:
        w = run.loaded_workload
        model = {"name": w.name, "config": dataclasses.asdict(w.config),
                 "prompts": w.prompt_source, "load_s": round(run.load_s, 1),
                 "torch": torch_options | {"grad": "torch.no_grad()", "mode": "eval"}}
    return {"schema_version": SCHEMA_VERSION, "machine": machine, "settings": settings,
            "model": model, "rows": run.rows, "sections": sections}


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    sections = dict(result["sections"])
    if "scaling" in sections:
        sections["scaling"] = {**sections["scaling"],
                               "records": scaling.to_json(sections["scaling"]["records"])}
    return {**result, "rows": [row.to_json() for row in result["rows"]], "sections": sections}


def markdown(result: dict[str, Any]) -> str:
    parts = ["## Benchmark: refusal_jax vs the PyTorch stack", "",
             machine_lines(result["machine"], result["settings"])]
    if result["model"] is not None:
        model = result["model"]
        config = model["config"]
        torch_side = model["torch"]
        parts.append(f"- Model: {model['name']} (d_model {config['d_model']}, "
                     f"{config['n_layers']} layers, {torch_side['dtype']}); prompts: "
                     f"{model['prompts']}; transformers side: the same weights, "
                     f"{torch_side['attention']} attention, {torch_side['device']}, eval mode, "
                     "torch.no_grad()")
    parts += ["", "Times: median [min–max] seconds per call; speed-up = baseline / ours run by "
              "run; peak RSS per step with the step's own increment in brackets.", "",
              markdown_table(result["rows"])]
    sections = result["sections"]
    if "load" in sections:
        cpu = {row.step.split(") ")[1].split(":")[0]: row.details["load_cpu_s"]
               for row in result["rows"] if row.section == load_time.SECTION}
        load = sections["load"]
        parts += ["", f"Load: CPU seconds of the loads {cpu}; the weights cache entry of "
                  f"{load['source']!r} takes {load['cache_entry_bytes'] / 2**20:.0f} MiB."]
    if "inlp" in sections and sections["inlp"].get("accuracy_table"):
        parts += ["", "First-classifier dev accuracy, same pairs and split:", "",
                  sections["inlp"]["accuracy_table"]]
    if "scaling" in sections:
        parts += ["", f"Scaling (base point {sections['scaling']['base_point']}; plot: "
                  f"{sections['scaling']['plot']}):", "",
                  scaling.markdown_table(sections["scaling"]["records"])]
    skipped = {name: info for name, info in sections.items() if info.get("status") == "skipped"}
    for name, info in skipped.items():
        parts.append(f"\n- Section {name} skipped: {info['reason']}")
    parts.append(f"\nCommand: `{result.get('command', '')}`; wall time {result.get('wall_s')} s")
    return "\n".join(parts)
