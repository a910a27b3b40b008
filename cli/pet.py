"""`rewrite pet`: zero-shot evaluation, PET and iPET from the command line (a thin wrapper over `rewrite.recipes.pet`)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from rewrite.cli.common import columns_option, console, out
from rewrite.training.data import CLASSIFICATION, Fields
from rewrite.errors import RewriteError
from rewrite.export.onnx import export_onnx
from rewrite.atomic import atomic_path, check_output_dir
from rewrite.text.labels import AGGREGATIONS
from rewrite.graph.pipeline import apply
from rewrite.text import labels
from rewrite.recipes import pet
from rewrite.training.train import check_config


def _write_results(output_dir: Path, results: dict) -> Path:
    path = output_dir / "results.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    return path


def _final_length(options: dict) -> dict:
    """--final-epochs, when given, replaces the step budget."""
    if options["final_epochs"] is not None:
        return {"epochs": options["final_epochs"], "max_steps": None}
    return {"max_steps": options["final_steps"]}


def _config(options: dict) -> pet.PetConfig:
    common = {"max_length": options["max_length"], "seed": options["seed"], "device": options["device"],
              "progress": False}
    defaults = pet.PetConfig()
    return pet.PetConfig(
        pattern_training=dataclasses.replace(defaults.pattern_training, epochs=options["epochs"], lr=options["lr"],
                                             batch_size=options["batch_size"], **common),
        final_training=dataclasses.replace(defaults.final_training, **_final_length(options),
                                           lr=options["final_lr"], batch_size=options["final_batch_size"], **common),
        lora={"rank": options["rank"], "alpha": options["lora_alpha"], "roles": ["q", "v"]},
        aggregation=options["aggregation"], mlm_alpha=options["mlm_alpha"], temperature=options["temperature"],
        reduction=options["reduction"], generations=options["generations"] if options["ipet"] else 1,
    )


@click.command(name="pet")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Hugging Face masked-LM directory.")
@click.option("--pvp", "pvp_file", required=True, type=click.Path(dir_okay=False),
              help="Pattern-verbalizer pairs, YAML or JSON.")
@click.option("--train", "train_file", type=click.Path(dir_okay=False), help="Labeled rows (.tsv, .csv, .jsonl).")
@click.option("--unlabeled", "unlabeled_file", type=click.Path(dir_okay=False), help="Unlabeled rows (labels ignored).")
@click.option("--eval", "eval_file", type=click.Path(dir_okay=False), help="Labeled evaluation rows.")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False), help="results.json and model.onnx.")
@click.option("--zero-shot", is_flag=True, help="Only evaluate each PVP without training (needs --eval).")
@click.option("--ipet", is_flag=True, help="iPET: PVP models over --generations generations.")
@click.option("--generations", type=int, default=3, show_default=True, help="iPET generations.")
@click.option("--text-field", default="text", show_default=True, help="Column of {text_a}.")
@click.option("--pair-field", default=None, help="Column of {text_b}.")
@click.option("--label-field", default="label", show_default=True)
@columns_option
@click.option("--unlabeled-limit", type=int, default=None, help="Use only the first N unlabeled rows.")
@click.option("--epochs", type=int, default=20, show_default=True, help="Epochs of each PVP model.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate of each PVP model.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--final-steps", type=int, default=300, show_default=True,
              help="Optimizer steps of the distilled classifier, whatever the size of --unlabeled.")
@click.option("--final-epochs", type=int, default=None, help="Epochs of the distilled classifier instead of --final-steps.")
@click.option("--final-lr", type=float, default=1e-3, show_default=True)
@click.option("--final-batch-size", type=int, default=32, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True,
              help="Tokens per patterned input (text slots are cut).")
@click.option("--rank", type=int, default=8, show_default=True, help="LoRA rank (on q and v).")
@click.option("--lora-alpha", type=float, default=16.0, show_default=True)
@click.option("--aggregation", type=click.Choice(AGGREGATIONS), default="mean", show_default=True)
@click.option("--mlm-alpha", type=float, default=None, help="PET's auxiliary loss: alpha * CE + (1 - alpha) * MLM.")
@click.option("--temperature", type=float, default=2.0, show_default=True, help="Distillation temperature.")
@click.option("--reduction", type=click.Choice(pet.REDUCTIONS), default="wmean", show_default=True,
              help="Ensemble weights: accuracy before training (wmean) or equal (mean).")
@click.option("--export", "export_choice", type=click.Choice(pet.EXPORTS), default="auto", show_default=True,
              help="Model written to model.onnx: the distilled classifier, the PVP model best on --eval, or auto "
                   "(the better of the two on --eval; distilled without --eval).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available).")
@click.option("--overwrite", is_flag=True, help="Replace files already in --output-dir (refused otherwise).")
def pet_command(model_dir: str, pvp_file: str, train_file: str | None, unlabeled_file: str | None,
                eval_file: str | None, output_dir: str, zero_shot: bool, text_field: str, pair_field: str | None,
                label_field: str, columns: tuple[str, ...] | None, unlabeled_limit: int | None, export_choice: str,
                overwrite: bool, **options) -> None:
    """Pattern-Exploiting Training: PVP models on the labeled rows, soft labels on the unlabeled rows,
    a distilled classifier exported to ONNX (folded, verified). Logs per-PVP and final accuracy."""
    pvps = labels.load_pvps(pvp_file)
    fields = Fields(text=text_field, pair=pair_field, label=label_field, columns=columns)
    config = _config(options)
    for training in (config.pattern_training, config.final_training):
        check_config(training, CLASSIFICATION)
    output = check_output_dir(output_dir, overwrite=overwrite)
    if zero_shot:
        if not eval_file:
            raise RewriteError("--zero-shot evaluates on --eval; give an evaluation file")
        base = pet.capture_masked_lm(model_dir)
        labels.check_label_words(pvps, base.info.tokenizer)
        results = pet.zero_shot(base, pvps, pet.read_data(eval_file, pvps, fields, labeled=True), config)
        for name, value in results["patterns"].items():
            out.print(f"zero-shot {name}: accuracy {value:.4f}")
        out.print(f"zero-shot ensemble: accuracy {results['ensemble']:.4f}")
        console.print(f"wrote {_write_results(output, {'zero_shot': results})}")
        return
    if not train_file or not unlabeled_file:
        raise RewriteError("PET trains on --train and distills on --unlabeled; give both (or --zero-shot)")
    if export_choice == "best-pvp" and not eval_file:
        raise RewriteError("--export best-pvp picks the PVP model by its accuracy on --eval; give an evaluation file")
    labeled = pet.read_data(train_file, pvps, fields, labeled=True)
    unlabeled = pet.read_data(unlabeled_file, pvps, fields, labeled=False, limit=unlabeled_limit)
    eval_set = pet.read_data(eval_file, pvps, fields, labeled=True) if eval_file else None
    result = pet.run_pet(model_dir, pvps, labeled, unlabeled, config, eval_set)
    for generation, models in enumerate(result.generations):
        for model in models:
            shown = "-" if model.eval_accuracy is None else f"{model.eval_accuracy:.4f}"
            out.print(f"generation {generation} {model.pvp.name}: train accuracy before training {model.weight:.4f}, "
                      f"eval accuracy {shown}")
    if result.final_accuracy is not None:
        out.print(f"ensemble: eval accuracy {result.ensemble_accuracy:.4f}")
        out.print(f"final classifier: eval accuracy {result.final_accuracy:.4f}")
    model, why = pet.exported_model(result, export_choice)
    apply(model, "fold")
    report = export_onnx(model, output / "model.onnx")
    console.print(f"wrote {report.path}: {why} (ONNX Runtime vs torch: max abs diff {report.max_abs_diff:.3g})")
    console.print(f"wrote {_write_results(output, {**result.summary(), 'exported': why})}")
