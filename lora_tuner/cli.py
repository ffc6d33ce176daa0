"""The `lora-tune` command: a thin click shell over the Python API. User errors exit 2 with one line each."""
import atexit
import logging
import os
import signal
import socket
import sys
import warnings
from functools import wraps
from pathlib import Path

import click

from .errors import UserError, about, fail
from .plan import DEVICE_NAMES

API_KEY = "LORA_TUNE_API_KEY"  # the environment variable serve and ui read their key from
SET_HELP = "Override a recipe field, e.g. --set train.learning_rate=1e-4 (repeatable)."


def user_errors(command):
    """Turn UserError into its lines on stderr and exit code 2: no traceback for bad input. Ctrl-C outside training
    (which stops gracefully on its own) ends with 130, like any program stopped by SIGINT. An option or argument
    given as an empty text is refused before the command runs (an empty --host would bind every interface)."""
    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            _refuse_empty(kwargs)
            return command(*args, **kwargs)
        except UserError as exc:
            for problem in exc.problems:
                click.echo(f"error: {problem}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("stopped by Ctrl-C; nothing unfinished was put in place", err=True)
            exit_after_a_stop(130)
    return wrapper


def _refuse_empty(values: dict) -> None:
    context = click.get_current_context()
    for parameter in context.command.params:
        value = values.get(parameter.name)
        given = value if isinstance(value, tuple) else (value,)
        if any(isinstance(item, str) and not item.strip() for item in given):
            label = parameter.opts[-1] if isinstance(parameter, click.Option) else parameter.human_readable_name
            raise fail(label, "is empty", f"give {label} a value, or leave it out", source=context.info_name)


def exit_after_a_stop(code: int) -> None:
    """Exit once a stop is handled: what had to be saved is saved, so a further Ctrl-C or SIGTERM while Python shuts
    down is ignored rather than printed as a traceback from its exit handlers (torch frees its libraries there).
    Ignored from the first exit handler on (the last registered runs first), so a command run in-process (tests'
    CliRunner) leaves the caller's signal handling as it was."""
    atexit.register(_ignore_stops)
    sys.exit(code)


def _ignore_stops() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def quiet_known_noise() -> None:
    """Third-party messages known to be harmless, kept off the user's screen (the library itself changes no global
    logging or warning state; the command does)."""
    # bitsandbytes: "Failed to load CPU gemm_4bit_forward from kernels-community" on import (an optional kernel
    # package), and "MatMul8bitLt: inputs will be cast" on every 8-bit call on CPU.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # transformers 5 renamed gradient checkpointing; peft and TRL still call the old names.
    warnings.filterwarnings("ignore", message=r".*(is_gradient_checkpointing|gradient_checkpointing_enable).*deprecated")
    warnings.filterwarnings("ignore", message=r".*use_liger_kernel=True.*deprecated")


class Commands(click.Group):
    """click's own refusals (a value of the wrong type or range, a missing option, an unknown command) in the one-line
    form every other error takes, exit code 2: click would print usage, a hint and the error on three lines."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
            if not standalone_mode:
                return result
            sys.exit(result if isinstance(result, int) else 0)  # as click's standalone mode ends (--help: its code)
        except click.exceptions.Abort:  # Ctrl-C or end of input at a prompt (chat)
            click.echo("", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            context = getattr(exc, "ctx", None)
            where = context.command_path if context else "lora-tune"
            param = getattr(exc, "param", None)
            field = param.opts[-1] if isinstance(param, click.Option) else param.human_readable_name if param else \
                "(command line)"
            click.echo(f"error: {where}: {field}: {exc.format_message().rstrip('.')}; see {where} --help", err=True)
            sys.exit(2)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """LoRA and QLoRA fine-tuning from a YAML recipe.

    \b
    Try it offline in a couple of minutes:
      lora-tune run recipes/demo-tiny-cpu.yaml
    """
    quiet_known_noise()


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(), help="Run folder (default: <output.root>/<output.name>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--force", is_flag=True, help="Replace an existing run folder of the same name.")
@click.option("--resume", is_flag=True, help="Continue an unfinished run from its newest complete checkpoint.")
@user_errors
def run(recipe, output, overrides, force, resume):
    """Train a LoRA adapter as RECIPE says.

    \b
    Examples:
      lora-tune run recipes/demo-tiny-cpu.yaml
      lora-tune run recipes/llama-7b-qlora-alpaca.yaml --set train.max_steps=100 --output adapters/trial
      lora-tune run recipes/demo-tiny-cpu.yaml --resume      # after a crash or Ctrl-C
    """
    from .config import load_recipe
    from .train.run import run as train_run
    from .train.checkpoints import Interrupted

    try:
        result = train_run(load_recipe(recipe, overrides), output=output, force=force, resume=resume)
    except Interrupted as stop:
        again = " ".join(["lora-tune run", recipe, *(f"--set {o}" for o in overrides),
                          *(["--output", output] if output else []), "--resume"])
        click.echo(f"{stop}. Continue with:\n  {again}", err=True)
        exit_after_a_stop(128 + stop.signum)
    if result.manifest:  # empty on ranks other than 0 under torchrun / accelerate launch
        click.echo(result.summary())


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False), required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--explain", is_flag=True, help="List every recipe field with its default and meaning.")
@user_errors
def validate(recipe, overrides, explain):
    """Check RECIPE and its data without loading weights: exit 0, or 2 with one line per problem.

    \b
    Examples:
      lora-tune validate recipes/demo-tiny-cpu.yaml
      lora-tune validate --explain
    """
    from .config import explain as explain_fields
    from .config import load_recipe
    from .preflight import check_recipe

    if explain:
        click.echo("\n".join(explain_fields()))
    if recipe is None:
        if not explain:
            raise click.UsageError("give a RECIPE to check, or --explain")
        return
    for note in check_recipe(load_recipe(recipe, overrides)):
        click.echo(f"note: {note}")
    click.echo(f"ok: {recipe}")


@main.command()
def recipes():
    """List the bundled recipes: each name works wherever a recipe file does (lora-tune run demo-tiny-cpu)."""
    from .config.bundled import bundled

    found = bundled()
    width = max(len(name) for name in found)
    for name, path in found.items():
        first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
        click.echo(f"{name:{width}s}  {first}")


@main.command()
@click.argument("adapter", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Folder for the merged model.")
@click.option("--base", help="Base model folder or hub id (default: the one the run recorded).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]),
              help="Merged weights' dtype (default: fp16 for 16-bit runs, bf16 if a value exceeds fp16; fp32 runs: fp32).")
@click.option("--into", type=click.Choice(["auto", "original", "dequantized"]), default="auto", show_default=True,
              help="QLoRA runs: the full-precision weights, the 4-bit weights as training saw them, or auto: both, "
              "keeping the one with the lower held-out loss.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
@click.option("--no-verify", is_flag=True, help="Skip scoring the export against base + adapter on held-out rows.")
@click.option("--verify-rows", type=click.IntRange(1), help="Held-out rows to verify on (default 16).")
@user_errors
def merge(adapter, out, base, dtype, into, shard_size, force, no_verify, verify_rows):
    """Fold the adapter in ADAPTER (a run folder) into its base; write standalone safetensors weights.

    \b
    Examples:
      lora-tune merge adapters/llama-7b-qlora-alpaca --out merged/llama-7b-alpaca
      lora-tune merge adapters/demo-tiny-cpu --out merged/demo --dtype fp32
    """
    from .export import merge as merge_adapter

    report = merge_adapter(adapter, out, base=base, dtype=dtype, into=into, shard_size=shard_size, force=force,
                           verify=not no_verify, verify_rows=verify_rows)
    click.echo(f"merged   {out}  ({len(report.files)} shard(s), {report.seconds:.1f} s)")
    click.echo(f"into     {report.into} weights ({report.into_reason})")
    click.echo(f"dtype    {report.dtype} ({report.dtype_reason})")
    v = report.verification
    if v is not None:
        kept = f", keeps {v.gain_kept:.1%} of the gain" if v.gain_kept is not None else ""
        click.echo(f"verified against the {v.reference} on {v.rows} {'held-out' if v.held_out else 'training'} rows: "
                   f"loss {v.loss_export:.4f} (adapter {v.loss_adapter:.4f}, base {v.loss_base:.4f}){kept}; "
                   f"top-1 agreement {v.top1_agreement:.1%}, mean KL {v.mean_kl:.2e}")


@main.command()
@click.argument("source", type=click.Path(file_okay=False, exists=True))
@click.option("--format", "target", type=click.Choice(["gguf", "gguf-lora"]), default="gguf", show_default=True,
              help="gguf: the merged model in one file; gguf-lora: the adapter alone, applied over --base-gguf by "
              "llama.cpp and Ollama (safetensors: use lora-tune merge).")
@click.option("--type", "kind", type=click.Choice(["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q5_k",
                                                   "q4_k"]),
              help="GGUF tensor type: f16/bf16 keep the merged weights, the others quantize them; q4_k_m, q5_k_m "
              "and q6_k mix types per tensor as llama-quantize does, q4_k and q5_k use one type throughout (default "
              "q8_0; gguf-lora writes f16).")
@click.option("--out", required=True, type=click.Path(), help="The .gguf file to write.")
@click.option("--base-gguf", type=click.Path(dir_okay=False, exists=True),
              help="gguf-lora: the base model's GGUF the adapter is applied over (verified against, and the "
              "Modelfile's FROM).")
@click.option("--into", type=click.Choice(["auto", "original", "dequantized"]), default="auto", show_default=True,
              help="For a QLoRA run folder: what the adapter is merged into (as lora-tune merge).")
@click.option("--no-verify", is_flag=True, help="Skip loading the GGUF and comparing it with base + adapter.")
@click.option("--verify-rows", type=click.IntRange(1), help="Held-out rows to verify on (default 16).")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@user_errors
def export(source, target, kind, out, base_gguf, into, no_verify, verify_rows, force):
    """Write SOURCE (a run folder, merged first, or a merged export) as one GGUF file for llama.cpp, Ollama and
    GPT4All, with an Ollama Modelfile beside it; or, with --format gguf-lora, the run's adapter alone.

    \b
    Examples:
      lora-tune export adapters/smollm2-135m-alpaca --type q8_0 --out smollm2-alpaca.gguf
      ollama create smollm2-alpaca -f smollm2-alpaca.Modelfile
      llama-cli -m smollm2-alpaca.gguf -cnv
    \b
      lora-tune export BASE_FOLDER --type q8_0 --out base.gguf
      lora-tune export adapters/smollm2-135m-alpaca --format gguf-lora --base-gguf base.gguf --out alpaca-lora.gguf
      llama-cli -m base.gguf --lora alpaca-lora.gguf -cnv
    """
    from .export import export as run_export

    report = run_export(source, out, target, kind, base_gguf, into, verify=not no_verify, verify_rows=verify_rows,
                        force=force)
    click.echo(f"exported {report.file}  ({report.type}, {report.bytes / 1e6:,.0f} MB, {report.seconds:.1f} s)")
    click.echo(f"ollama   ollama create NAME -f {report.modelfile}")
    v = report.verification
    if v is not None:
        rows = f"{v.rows} {'held-out' if v.held_out else 'sample'} rows"
        against = "base + adapter" if report.applies_to else "the merged model"
        click.echo(f"verified by {v.judge} on {rows}: top-1 agreement "
                   f"{v.top1_agreement:.1%} with {against}, mean KL {v.mean_kl:.2e}, tokenizer round trip "
                   f"{'ok' if v.tokenizer_round_trip else 'FAILED'}")


@main.command(name="import-gguf")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Folder for the Hugging Face model.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
@user_errors
def import_gguf(file, out, dtype, force):
    """Turn a GGUF model file (llama.cpp, GPT4All, Ollama) into a Hugging Face folder to train on.

    The quantized weights are dequantized: the folder holds what the GGUF holds, in DTYPE.

    \b
    Example:
      lora-tune import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m
    """
    from .model.gguf_import import import_gguf as run_import

    click.echo(f"imported: {run_import(file, out, dtype=dtype, force=force)}")


@main.command(name="eval")
@click.argument("folder", type=click.Path(file_okay=False, exists=True))
@click.option("--merged", type=click.Path(file_okay=False, exists=True), help="A merged export to score as well.")
@click.option("--data", help="Score these rows (a data file in the run's format) instead of the run's validation rows.")
@click.option("--rows", type=click.IntRange(1), help="Score only the first N rows.")
@click.option("--generate", "generations", default=0, show_default=True, type=click.IntRange(0),
              help="Also show K greedy generations, base and adapter side by side.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1))
@user_errors
def evaluate(folder, merged, data, rows, generations, max_new_tokens):
    """Held-out response loss and perplexity of the base, base + adapter and a merged export.

    FOLDER is a run folder or a merged export. Writes eval.json and eval.md into it.

    \b
    Examples:
      lora-tune eval adapters/smollm2-135m-alpaca --generate 3
      lora-tune eval adapters/smollm2-135m-alpaca --merged merged/smollm2-alpaca
      lora-tune eval merged/smollm2-alpaca --rows 50
    """
    from .eval.evaluate import evaluate as run_eval

    report = run_eval(folder, merged=merged, data=data, rows=rows, generate=generations, max_new_tokens=max_new_tokens)
    click.echo(report.table())
    for i, shown in enumerate(report.generations, start=1):
        click.echo(f"\n[{i}] ...{shown['prompt'][-160:]}\n  base:    {shown['base'].strip()[:400]}\n"
                   f"  adapter: {shown['adapter'].strip()[:400]}")
    click.echo(f"\nwritten: {Path(folder) / 'eval.json'}, {Path(folder) / 'eval.md'}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--device", "--gpu", "device", default="h100", show_default=True, type=click.Choice(DEVICE_NAMES),
              help="What to plan for: a GPU, or cpu (this machine).")
@click.option("--tokens", type=click.IntRange(1), help="Tokens the run trains on, when the data set is not local or "
              "known.")
@click.option("--world-size", default=1, show_default=True, type=click.IntRange(1),
              help="GPUs the run is launched on (per-GPU memory follows distributed.strategy).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@user_errors
def plan(recipe, device, tokens, world_size, overrides):
    """Memory breakdown and time estimate for RECIPE, from the model config alone (no weights). Exits 1 when it
    does not fit, saying what would make it fit.

    \b
    Examples:
      lora-tune plan llama-7b-qlora-alpaca --device t4
      lora-tune plan gptj-6b-qlora-alpaca --set train.batch_size=4
      lora-tune plan smollm2-135m-alpaca --device cpu
    """
    from .config import load_recipe
    from .plan.estimate import make_plan

    found = make_plan(load_recipe(recipe, overrides), device, tokens, world_size)
    click.echo("\n".join(found.lines()))
    if not found.fits:
        sys.exit(1)


def _pool(adapters: tuple[str, ...], base: str | None, max_loaded: int = 8):
    """A pool on --base (or the first run folder's base) holding each adapter under its folder's name."""
    from .adapters import AdapterPool
    from .adapters.compat import adapter_name

    pool = AdapterPool(base or adapters[0], max_loaded=max_loaded)
    for folder in adapters:
        pool.add(adapter_name(folder), folder)
    return pool


ADAPTER_HELP = "A run folder or PEFT adapter folder (repeatable); its folder name becomes the adapter's name."


@main.command()
@click.option("--adapter", "adapters", multiple=True, required=True, type=click.Path(file_okay=False),
              help=ADAPTER_HELP)
@click.option("--prompt", "prompts", multiple=True, required=True, help="Instruction text (repeatable).")
@click.option("--base", help="Base model folder (default: the first run folder's base).")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--no-template", is_flag=True, help="Send the prompt as is, not in the run's training template.")
@user_errors
def generate(adapters, prompts, base, max_new_tokens, no_template):
    """Generate with each adapter, then the bare base, for each prompt (greedy), in the prompt format each adapter
    was trained on (the base in the first adapter's).

    \b
    Examples:
      lora-tune generate --adapter adapters/demo-tiny-cpu --prompt "Reverse the word."
      lora-tune generate --adapter adapters/a --adapter adapters/b --prompt "Summarise: ..."
    """
    pool = _pool(adapters, base)
    for prompt in prompts:
        for name in [*pool.names, None]:  # the bare base last, in the same prompt format, to compare with
            text = pool.generate(prompt, adapter=name, max_new_tokens=max_new_tokens, template=not no_template)
            click.echo(f"[{name or 'base'}] {text}")


@main.command()
@click.option("--adapter", "adapters", multiple=True, required=True, type=click.Path(file_okay=False),
              help=ADAPTER_HELP)
@click.option("--base", help="Base model folder (default: the first run folder's base).")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(1))
@user_errors
def chat(adapters, base, max_new_tokens):
    """Talk to adapters one instruction at a time. /adapter NAME switches (/adapter none: the bare base),
    /adapters lists them, /quit ends.

    \b
    Example:
      lora-tune chat --adapter adapters/support --adapter adapters/legal
    """
    pool = _pool(adapters, base)
    current = pool.names[0]
    click.echo(f"adapters: {', '.join(pool.names)}; talking to {current}. /adapter NAME switches, /quit ends.")
    while True:
        line = click.prompt(f"{current or 'base'}>", default="", show_default=False, prompt_suffix=" ").strip()
        if line in ("/quit", "/exit"):
            return
        if line == "/adapters":
            click.echo(", ".join(pool.names))
        elif line.startswith("/adapter"):
            wanted = line.removeprefix("/adapter").strip()
            if wanted in pool.names or wanted == "none":
                current = None if wanted == "none" else wanted
            else:
                click.echo(f"no adapter {wanted!r}; known: {', '.join(pool.names)} or none")
        elif line:
            click.echo(pool.generate(line, adapter=current, max_new_tokens=max_new_tokens))


@main.command()
@click.option("--adapter", "adapters", multiple=True, type=click.Path(file_okay=False, exists=True),
              help=ADAPTER_HELP)
@click.option("--base", help="Base model folder (default: the first run folder's base).")
@click.option("--base-name", default="base", show_default=True, help="The `model` name that selects the bare base.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-loaded", default=8, show_default=True, type=click.IntRange(1),
              help="Adapters kept in memory (least recently used re-read from disk on demand).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1),
              help="Requests generated together in one forward, each with its own adapter.")
@click.option("--api-key", help=f"Require 'Authorization: Bearer KEY' (or set {API_KEY}).")
@click.option("--insecure", is_flag=True, help="Allow a --host beyond loopback without an API key.")
@click.option("--adapter-root", type=click.Path(file_okay=False, exists=True),
              help="POST /v1/adapters may add adapters from folders under this one (else only those given at start).")
@click.option("--max-body", default="4MB", show_default=True, help="Largest request body accepted (413 above).")
@user_errors
def serve(adapters, base, base_name, host, port, max_loaded, max_batch, api_key, insecure, adapter_root, max_body):
    """Serve adapters behind one OpenAI-compatible endpoint (/v1/models, /v1/completions, /v1/chat/completions,
    streaming included): the request's `model` picks the adapter by name, or the bare base. Needs the serve extra:
    pip install 'lora-tune[serve]'.

    \b
    Examples:
      lora-tune serve --adapter adapters/smollm2-135m-alpaca
      lora-tune serve --adapter adapters/support --adapter adapters/legal --port 8001 --api-key s3cret
      curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "support", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from . import sizes

    if not adapters and not base:
        raise fail("--adapter", "nothing to serve", "give --adapter DIR (repeatable) and/or --base MODEL", source="serve")
    with about("serve"):
        max_body = sizes.parse(max_body, "--max-body")
    from .adapters.compat import adapter_name

    api_key = _api_key("serve", api_key)
    uvicorn = _server_checks("serve", host, port, api_key, insecure)
    _check_base_name("serve", base_name, [adapter_name(folder) for folder in adapters])
    from .serve.openai_api import create_app

    pool = _pool(adapters, base, max_loaded)
    app = create_app(pool, base_name=base_name, api_key=api_key, max_batch=max_batch, max_body=max_body,
                     adapter_root=Path(adapter_root) if adapter_root else None, host=host)
    served = ", ".join([f"{base_name} (the bare base)", *pool.names])
    click.echo(f"serving {served} on http://{host}:{port}/v1 (OpenAI-compatible); Ctrl-C stops", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _api_key(command: str, given: str | None) -> str | None:
    """--api-key, else LORA_TUNE_API_KEY; an empty key from either is refused: it would let anyone in."""
    key = given if given is not None else os.environ.get(API_KEY)
    if key is not None and not key.strip():
        field = "--api-key" if given is not None else API_KEY
        raise fail(field, "the key is empty, which would let anyone in", "give a real key, or leave it unset", source=command)
    return key


def _check_base_name(command: str, base_name: str, adapters: list[str]) -> None:
    if base_name in adapters:
        raise fail("--base-name", f"{base_name!r} is also an adapter's name, so one model name would select "
                   "two models", "choose another --base-name, or rename that adapter's folder", source=command)


def _server_checks(command: str, host: str, port: int, api_key: str | None, insecure: bool):
    """What `serve` and `ui` refuse before minutes of loading, each in one line; returns uvicorn. Beyond loopback a
    server answers anyone who can reach the machine: it needs a key, or --insecure said out loud."""
    from .serve.hosts import is_loopback

    if not is_loopback(host) and api_key is None and not insecure:
        raise fail("--host", f"{host!r} reaches beyond this machine, and no API key is set, so anyone on the "
                   "network could use the server", f"set {API_KEY} (or --api-key), or pass --insecure if that is meant",
                   source=command)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:  # uvicorn would exit 3 with its own lines
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise fail("--port", f"{host}:{port} cannot be used ({exc.strerror})",
                       "choose another --port, or stop what listens there", source=command) from None
    try:
        import fastapi  # noqa: F401  (the serve extra)
        import uvicorn
    except ImportError as exc:
        raise fail("(packages)", f"{exc.name} is not installed",
                   "pip install 'lora-tune[serve]' (FastAPI and uvicorn)", source=command) from None
    return uvicorn


@main.command()
@click.argument("root", default="adapters")
@click.option("--base", help="Base model the playground loads (default: the first finished run's base); runs on "
              "other bases are listed but not served.")
@click.option("--base-name", default="base", show_default=True, help="The name the bare base goes by.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", help=f"Require this key (the page asks for it once; or set {API_KEY}).")
@click.option("--insecure", is_flag=True, help="Allow a --host beyond loopback without an API key.")
@user_errors
def ui(root, base, base_name, host, port, api_key, insecure):
    """A local page over ROOT's run folders: every run and its state, live loss curves, the resolved recipe, fast
    path, dropped rows and evaluation; runs compared on one chart; and a playground where the base and each adapter
    answer one prompt side by side, streamed. Needs the serve extra: pip install 'lora-tune[serve]'.

    \b
    Examples:
      lora-tune ui                      # adapters/, at http://127.0.0.1:8080
      lora-tune ui runs/ --port 9000 --api-key s3cret
    """
    from .ui.runs import healthy, run_folders

    folder = Path(root)
    if not folder.is_dir():
        raise fail("ROOT", f"{root!r} is not a folder", "point at the folder that holds run folders (adapters/)", source="ui")
    api_key = _api_key("ui", api_key)
    uvicorn = _server_checks("ui", host, port, api_key, insecure)
    from .ui.app import create_ui_app

    finished = [run for run in run_folders(folder).values() if healthy(run)]  # damaged runs are listed, not served
    if not base and not finished:
        raise fail("ROOT", f"{root!r} holds no finished run to take the playground's base from",
                   "pass --base MODEL, or train a run first", source="ui")
    pool = _pool((), base or str(finished[0].path))  # a run folder: its base, loaded with the run's tokenizer
    _serve_runs(pool, finished, base_name)
    click.echo(f"lora-tune ui on http://{host}:{port}/ ({len(finished)} finished runs, {len(pool.names)} served on "
               f"{pool.base_id}); Ctrl-C stops", err=True)
    uvicorn.run(create_ui_app(folder, pool, base_name=base_name, api_key=api_key, host=host), host=host, port=port,
                log_level="warning")


def _serve_runs(pool, finished: list, base_name: str) -> None:
    """Each finished run on the pool's base in the playground, under its folder's name; one that cannot be served
    (its base changed, its adapter is damaged, its name is the base's) is said once and left out."""
    from .adapters.compat import adapter_name
    from .run_folder import same_base

    for run in finished:
        name = adapter_name(run.path)
        try:
            if name == base_name:
                raise fail("name", f"{name!r} is the bare base's name (--base-name)", "rename the run "
                           "folder, or pass another --base-name", source=str(run.path))
            if same_base(run.base_model(), pool.base_id):
                pool.add(name, run.path)
        except UserError as exc:
            click.echo(f"note: not served in the playground: {exc.problems[0]}", err=True)


if __name__ == "__main__":
    main()
