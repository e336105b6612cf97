"""Everything that can be checked before a model is loaded: datasets, tokens, schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.api import RunConfig
from kubetune_trainer import sources
from kubetune_trainer.errors import ConfigError, DatasetError
from kubetune_trainer.train.data import Example, load_examples, split_validation
from kubetune_trainer.train.encoding import Encoded, UnlabelledTurn, encode
from kubetune_trainer.train.microbatches import Schedule, schedule


@dataclass
class PreparedData:
    format: str
    train: list[Encoded]
    validation: list[Encoded]
    validation_examples: list[Example]
    truncated: int
    dropped: int
    system_dropped: int
    schedule: Schedule


def load_datasets(run: RunConfig) -> tuple[str, list[Example], list[Example]]:
    """Training and validation examples, all lines checked (raises DatasetError)."""
    dataset = run.spec.dataset
    fmt, train = load_examples(sources.resolve_dataset(dataset.source), dataset.format.value)
    validation: list[Example] = []
    if dataset.validation and dataset.validation.source:
        validation_file = sources.resolve_dataset(dataset.validation.source,
                                                  "spec.dataset.validation.source")
        _, validation = load_examples(validation_file, fmt)
    elif dataset.validation and dataset.validation.split_percent:
        if len(train) < 2:
            raise ConfigError(f"{dataset.source}: too few records to split off a validation set")
        train, validation = split_validation(
            train, dataset.validation.split_percent, run.spec.training.seed
        )
    elif (shipped := sources.builtin_split(dataset.source, "validation")) is not None:
        _, validation = load_examples(shipped, fmt)
    return fmt, train, validation


def encode_all(tokenizer: Any, examples: list[Example], limit: int, source: str,
               ) -> list[Encoded]:
    """Encode every example; a turn the chat template rewrites fails with its line."""
    encoded = []
    for example in examples:
        try:
            encoded.append(encode(tokenizer, example, limit))
        except UnlabelledTurn as error:
            raise DatasetError(source, example.line, str(error)) from None
    return encoded


def validation_source(run: RunConfig) -> str:
    validation = run.spec.dataset.validation
    if validation is not None and validation.source:
        return validation.source
    return run.spec.dataset.source


def prepare(run: RunConfig, tokenizer: Any, fmt: str, train: list[Example],
            validation: list[Example], world: int) -> PreparedData:
    """Tokenise; drop records with nothing to learn after truncation; plan the steps."""
    limit = run.spec.training.max_seq_length
    encoded = encode_all(tokenizer, train, limit, run.spec.dataset.source)
    kept = [r for r in encoded if r.targets > 0]
    if len(kept) < world:
        raise ConfigError(
            f"{run.spec.dataset.source}: {len(kept)} usable records for {world} ranks "
            f"(records whose answer is cut off by maxSeqLength {limit} have no loss)"
        )
    plan = run.plan
    steps = schedule(
        len(kept), plan.global_batch_size, world, run.spec.training.epochs,
        run.spec.training.max_steps,
    )
    return PreparedData(
        format=fmt,
        train=kept,
        validation=encode_all(tokenizer, validation, limit, validation_source(run)),
        validation_examples=validation,
        truncated=sum(r.truncated for r in encoded),
        dropped=len(encoded) - len(kept),
        system_dropped=sum(r.system_dropped for r in encoded),
        schedule=steps,
    )
