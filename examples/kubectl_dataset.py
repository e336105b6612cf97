"""Generate the quickstart's data: plain-English requests and the one kubectl command each means.

Every record is a Chat-format JSONL line (system, user, assistant). The answers are
systematic (`kubectl <verb> <target> [flags] [-n NAMESPACE] [-o FORMAT]`), so a small model can
learn them from a few hundred examples, while the requests vary in phrasing, resource kinds,
names, namespaces, replica counts, ports and output formats. Names are drawn from a large
space, so the held-out test split mostly asks about names the model never saw.

The output is a pure function of the seed and the split sizes: the same arguments write the
same bytes. No request appears in two splits, so the test split measures generalisation.

    python examples/kubectl_dataset.py                # rewrite the committed splits
    python examples/kubectl_dataset.py --output DIR   # somewhere else
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SYSTEM_PROMPT = "Answer with one kubectl command."
DEFAULT_SEED = 7
DEFAULT_SIZES = {"train": 600, "validation": 40, "test": 100}
DEFAULT_OUTPUT = (
    Path(__file__).resolve().parents[1]
    / "trainer-image/src/kubetune_trainer/datasets/kubectl-commands"
)

# kind -> (singular words users say, plural words users say, canonical plural for `get`)
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "pod": (("pod",), ("pods",), "pods"),
    "deployment": (("deployment", "deploy"), ("deployments",), "deployments"),
    "service": (("service", "svc"), ("services",), "services"),
    "configmap": (("configmap", "config map"), ("configmaps", "config maps"), "configmaps"),
    "secret": (("secret",), ("secrets",), "secrets"),
    "statefulset": (("statefulset", "stateful set"), ("statefulsets",), "statefulsets"),
    "daemonset": (("daemonset", "daemon set"), ("daemonsets",), "daemonsets"),
    "job": (("job",), ("jobs",), "jobs"),
    "ingress": (("ingress",), ("ingresses",), "ingresses"),
}
NAME_HEADS = (
    "web", "api", "auth", "billing", "cart", "checkout", "search", "orders", "payments",
    "redis", "postgres", "kafka", "nginx", "frontend", "backend", "worker", "metrics",
    "gateway", "inventory", "notifier", "mailer", "scheduler", "ledger", "catalog", "profile",
    "reports", "shipping", "invoice", "media", "chat", "queue", "cache", "analytics", "users",
)
NAME_TAILS = ("", "", "-api", "-db", "-cache", "-worker", "-v2", "-service", "-proxy", "-ui")
NAMESPACES = (
    "prod", "staging", "dev", "qa", "monitoring", "kube-system", "ingress-nginx", "payments",
    "team-a", "team-b", "data", "ml", "logging", "ci", "sandbox", "backend", "edge", "infra",
)
FORMATS = {"yaml": ("as yaml", "in YAML"), "json": ("as json", "in JSON format"),
           "wide": ("with more details", "in wide format")}
LABEL_KEYS = ("app", "tier", "env", "team", "owner", "release")
LABEL_VALUES = ("frontend", "backend", "canary", "stable", "prod", "blue", "green", "alpha")

Record = tuple[str, str]  # (request, command)


def _name(rng: random.Random) -> str:
    return rng.choice(NAME_HEADS) + rng.choice(NAME_TAILS)


def _pod_name(rng: random.Random) -> str:
    # Pods are named like a Deployment's (hash suffix) or a StatefulSet's (ordinal).
    if rng.random() < 0.5:
        return f"{_name(rng)}-{rng.randrange(16**5):05x}"
    return f"{_name(rng)}-{rng.randrange(4)}"


def _namespace(rng: random.Random) -> tuple[str, str]:
    """(phrase for the request, flag for the command); a third of requests use the default."""
    if rng.random() < 0.3:
        return "", ""
    ns = rng.choice(NAMESPACES)
    phrase = rng.choice((f" in namespace {ns}", f" in the {ns} namespace", f" in {ns}"))
    return phrase, f" -n {ns}"


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def _list(rng: random.Random) -> Record:
    kind = rng.choice(list(KINDS))
    _, plurals, canonical = KINDS[kind]
    noun = rng.choice(plurals)
    if rng.random() < 0.15:
        ns_phrase, ns_flag = rng.choice((" in all namespaces", " across all namespaces")), " -A"
    else:
        ns_phrase, ns_flag = _namespace(rng)
    out_phrase, out_flag = "", ""
    if rng.random() < 0.35:
        fmt = rng.choice(list(FORMATS))
        out_phrase, out_flag = " " + rng.choice(FORMATS[fmt]), f" -o {fmt}"
    verb = rng.choice(("list the", "show me the", "get all", "list all", "what are the"))
    request = f"{_capital(verb)} {noun}{ns_phrase}{out_phrase}"
    return request, f"kubectl get {canonical}{ns_flag}{out_flag}"


def _target(rng: random.Random, kinds: tuple[str, ...]) -> tuple[str, str, str]:
    """(kind, word the user says for it, object name)."""
    kind = rng.choice(kinds)
    name = _pod_name(rng) if kind == "pod" else _name(rng)
    return kind, rng.choice(KINDS[kind][0]), name


def _describe(rng: random.Random) -> Record:
    kind, word, name = _target(rng, tuple(KINDS))
    ns_phrase, ns_flag = _namespace(rng)
    verb = rng.choice(("describe the", "show details of the", "give me the details of",
                       "describe"))
    return f"{_capital(verb)} {word} {name}{ns_phrase}", f"kubectl describe {kind} {name}{ns_flag}"


def _get_one(rng: random.Random) -> Record:
    kind, word, name = _target(rng, tuple(KINDS))
    ns_phrase, ns_flag = _namespace(rng)
    fmt = rng.choice(list(FORMATS))
    verb = rng.choice(("get the", "show the", "print the", "fetch the"))
    request = f"{_capital(verb)} {word} {name}{ns_phrase} {rng.choice(FORMATS[fmt])}"
    return request, f"kubectl get {kind} {name}{ns_flag} -o {fmt}"


def _delete(rng: random.Random) -> Record:
    kind, word, name = _target(rng, tuple(KINDS))
    ns_phrase, ns_flag = _namespace(rng)
    verb = rng.choice(("delete the", "remove the", "get rid of the", "delete"))
    return f"{_capital(verb)} {word} {name}{ns_phrase}", f"kubectl delete {kind} {name}{ns_flag}"


def _scale(rng: random.Random) -> Record:
    kind, word, name = _target(rng, ("deployment", "statefulset"))
    ns_phrase, ns_flag = _namespace(rng)
    replicas = rng.randrange(0, 13)
    request = rng.choice((
        f"Scale the {word} {name}{ns_phrase} to {replicas} replicas",
        f"Set the replicas of {word} {name}{ns_phrase} to {replicas}",
        f"I need {replicas} replicas of the {word} {name}{ns_phrase}",
        f"Change the {word} {name}{ns_phrase} to run {replicas} replicas",
    ))
    return request, f"kubectl scale {kind} {name} --replicas={replicas}{ns_flag}"


def _logs(rng: random.Random) -> Record:
    pod = _pod_name(rng)
    ns_phrase, ns_flag = _namespace(rng)
    choice = rng.randrange(3)
    if choice == 0:
        request = rng.choice((f"Show the logs of pod {pod}{ns_phrase}",
                              f"Print logs for {pod}{ns_phrase}"))
        return request, f"kubectl logs {pod}{ns_flag}"
    if choice == 1:
        lines = rng.choice((10, 20, 50, 100, 200, 500))
        request = rng.choice((f"Show the last {lines} log lines of pod {pod}{ns_phrase}",
                              f"Tail {lines} lines of logs from {pod}{ns_phrase}"))
        return request, f"kubectl logs {pod} --tail={lines}{ns_flag}"
    request = rng.choice((f"Follow the logs of pod {pod}{ns_phrase}",
                          f"Stream logs from {pod}{ns_phrase}"))
    return request, f"kubectl logs {pod} -f{ns_flag}"


def _rollout(rng: random.Random) -> Record:
    kind, word, name = _target(rng, ("deployment", "statefulset", "daemonset"))
    ns_phrase, ns_flag = _namespace(rng)
    if rng.random() < 0.6:
        request = rng.choice((f"Restart the {word} {name}{ns_phrase}",
                              f"Do a rolling restart of {word} {name}{ns_phrase}",
                              f"Redeploy the {word} {name}{ns_phrase}"))
        return request, f"kubectl rollout restart {kind}/{name}{ns_flag}"
    request = rng.choice((f"Check the rollout status of {word} {name}{ns_phrase}",
                          f"Is the rollout of {word} {name}{ns_phrase} done?"))
    return request, f"kubectl rollout status {kind}/{name}{ns_flag}"


def _port_forward(rng: random.Random) -> Record:
    remote = rng.choice((80, 443, 3000, 5432, 6379, 8000, 8080, 9090))
    local = rng.choice((8080, 8000, 9000, 3000, 5000, 15432, remote))
    ns_phrase, ns_flag = _namespace(rng)
    if rng.random() < 0.5:
        name, prefix, word = _name(rng), "svc", rng.choice(("service", "svc"))
    else:
        name, prefix, word = _pod_name(rng), "pod", "pod"
    request = rng.choice((
        f"Forward local port {local} to port {remote} of {word} {name}{ns_phrase}",
        f"Port-forward {word} {name}{ns_phrase} port {remote} to localhost:{local}",
    ))
    return request, f"kubectl port-forward {prefix}/{name} {local}:{remote}{ns_flag}"


def _create_namespace(rng: random.Random) -> Record:
    ns = rng.choice((rng.choice(NAMESPACES), _name(rng), f"team-{_name(rng)}"))
    request = rng.choice((f"Create a namespace called {ns}", f"Make a new namespace {ns}",
                          f"Create the {ns} namespace"))
    return request, f"kubectl create namespace {ns}"


def _label(rng: random.Random) -> Record:
    kind, word, name = _target(rng, ("pod", "deployment", "service", "statefulset"))
    ns_phrase, ns_flag = _namespace(rng)
    key, value = rng.choice(LABEL_KEYS), rng.choice(LABEL_VALUES)
    request = rng.choice((f"Label the {word} {name}{ns_phrase} with {key}={value}",
                          f"Add the label {key}={value} to {word} {name}{ns_phrase}"))
    return request, f"kubectl label {kind} {name} {key}={value}{ns_flag}"


GENERATORS: tuple[Callable[[random.Random], Record], ...] = (
    _list, _describe, _get_one, _delete, _scale, _logs, _rollout, _port_forward,
    _create_namespace, _label,
)


def chat_record(request: str, command: str) -> dict[str, list[dict[str, str]]]:
    """One training record in Chat format."""
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": request},
        {"role": "assistant", "content": command},
    ]}


def generate(seed: int = DEFAULT_SEED, sizes: dict[str, int] | None = None
             ) -> dict[str, list[Record]]:
    """Splits of distinct requests; a request never appears in two splits."""
    sizes = sizes or DEFAULT_SIZES
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[Record]] = {}
    # Kinds of request rotate so every split covers every kind in equal shares.
    for split, size in sizes.items():
        records: list[Record] = []
        while len(records) < size:
            request, command = GENERATORS[len(records) % len(GENERATORS)](rng)
            if request.lower() not in seen:
                seen.add(request.lower())
                records.append((request, command))
        rng.shuffle(records)
        splits[split] = records
    return splits


def write_splits(output: Path, seed: int = DEFAULT_SEED, sizes: dict[str, int] | None = None
                 ) -> dict[str, Path]:
    """Write `<split>.jsonl` files into `output`; returns their paths."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, records in generate(seed, sizes).items():
        path = output / f"{split}.jsonl"
        lines = (json.dumps(chat_record(*record), ensure_ascii=False) for record in records)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="directory")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    for split, size in DEFAULT_SIZES.items():
        parser.add_argument(f"--{split}", type=int, default=size, help=f"{split} records")
    args = parser.parse_args(argv)
    sizes = {split: getattr(args, split) for split in DEFAULT_SIZES}
    for split, path in write_splits(args.output, args.seed, sizes).items():
        print(f"{split}: {sizes[split]} records -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
