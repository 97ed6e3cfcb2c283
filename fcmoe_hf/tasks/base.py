"""The [`Task`] interface a federation trains and evaluates through, and the registry of tasks by name."""

from __future__ import annotations

import abc
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Optional, TypeVar, Union

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ..data.corpora import LABEL_COLUMN, TEXT_COLUMN

#: How many tokenized evaluation splits a task keeps (a federation's global test split and one per client).
_TOKENIZED_CACHE_SIZE = 256


class Task(abc.ABC):
    """What a federation needs from a task: how to load the model, tokenize and batch training data, and evaluate.

    A task is built for one corpus (its text and label columns, its class names) and one tokenizer, then used for
    every client: [`tokenize`] turns a raw split into training features, [`data_collator`] batches them, and
    [`evaluate`] scores a model on a raw (untokenized) split. Subclasses set the class attributes and implement
    [`tokenize`] and [`evaluate`]; register them with [`register_task`] to build them by name with [`build_task`].

    Class attributes:
        name (`str`): the registry name (`"category"`, `"causal_lm"`, `"sequence_classification"`, ...).
        task_type (`str`): the peft `TaskType` to build the adapter config with (`MoELoraConfig(task_type=...)`),
            e.g. `"SEQ_CLS"`, for which peft trains and saves the new classification head in full
            (`modules_to_save`): it is then federated like the adapter, as a tensor shared by all experts.
        auto_model_class (`type`): the `transformers` auto class [`load_model`] loads the base model with.
        headline_metrics (`tuple[str, ...]`): the keys of [`evaluate`]'s result to show and plot, the main one first.

    Args:
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the model's tokenizer. May be left out and set later,
            by [`load_model`] or by assigning `task.tokenizer`; [`tokenize`], [`data_collator`] and [`evaluate`]
            need it.
        text_column (`str`): the column holding the text.
        label_column (`str`): the column holding the class id (used by the tasks that predict a class).
        label_names (`Sequence[str]`, *optional*): the class names in label order; tasks that need them and get
            none read them from the `ClassLabel` feature of `label_column`.
        max_length (`int`): maximum number of tokens per example.
    """

    name: ClassVar[str] = ""
    task_type: ClassVar[str] = "CAUSAL_LM"
    auto_model_class: ClassVar[type] = AutoModelForCausalLM
    headline_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        *,
        text_column: str = TEXT_COLUMN,
        label_column: str = LABEL_COLUMN,
        label_names: Optional[Sequence[str]] = None,
        max_length: int = 256,
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self._tokenizer = tokenizer
        self._collator: Optional[Callable] = None
        self._tokenized: OrderedDict[str, Dataset] = OrderedDict()
        self.text_column = text_column
        self.label_column = label_column
        self.label_names = list(label_names) if label_names is not None else None
        self.max_length = max_length

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, max_length={self.max_length}, label_names={self.label_names})"

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer (set at construction, by [`load_model`], or by assignment)."""
        if self._tokenizer is None:
            raise ValueError(
                f"the {self.name!r} task has no tokenizer yet: pass tokenizer= to build_task, call task.load_model(), "
                "or set task.tokenizer"
            )
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._tokenized.clear()
        self._collator = None

    @property
    def model_card_description(self) -> str:
        """One line describing the task, for model cards."""
        return self.name

    @abc.abstractmethod
    def tokenize(self, dataset: Dataset) -> Dataset:
        """Training features of the raw `dataset`: the columns [`data_collator`] batches and the model's forward takes
        (`input_ids`, `attention_mask`, `labels`, ...); the raw columns are removed."""

    def tokenized(self, dataset: Dataset) -> Dataset:
        """[`tokenize`], memoized by the dataset's fingerprint: a federation scores the same test splits every round,
        and `datasets.map` costs more than a forward pass on splits this small."""
        key = getattr(dataset, "_fingerprint", None)
        if key is None:
            return self.tokenize(dataset)
        if key not in self._tokenized:
            self._tokenized[key] = self.tokenize(dataset)
            while len(self._tokenized) > _TOKENIZED_CACHE_SIZE:
                self._tokenized.popitem(last=False)
        self._tokenized.move_to_end(key)
        return self._tokenized[key]

    @property
    def data_collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """The collator that batches [`tokenize`]'s features (built once per tokenizer)."""
        if self._collator is None:
            self._collator = self.build_data_collator()
        return self._collator

    @abc.abstractmethod
    def build_data_collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """A new collator for [`tokenize`]'s features; [`data_collator`] caches it."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, dataset: Dataset, batch_size: int = 16) -> dict[str, float]:
        """Score `model` on the raw (untokenized) `dataset` in batches of `batch_size`; returns metric name -> value.

        The model's training mode is restored afterwards, and MoE-LoRA routing statistics are not recorded.
        """

    def model_kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` keyword arguments [`load_model`] passes (e.g. `num_labels`)."""
        return {}

    def load_model(
        self,
        model_name_or_path: Union[str, os.PathLike],
        torch_dtype: Union[str, torch.dtype, None] = None,
        **kwargs: Any,
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """Load the base model with [`auto_model_class`] and its tokenizer, and make the tokenizer the task's.

        Args:
            model_name_or_path (`str` or `os.PathLike`): a model alias (`"smollm2-135m-instruct"`, `"minilm-l6"`),
                a local directory, a `.gguf` file or a Hub id; see [`~fcmoe_hf.modeling.load_base_model`].
            torch_dtype (`str` or `torch.dtype`, *optional*): dtype of the loaded model.
            kwargs: passed to [`~fcmoe_hf.modeling.load_base_model`], after [`model_kwargs`].

        Returns:
            `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: the model and its tokenizer (with a pad token;
            `model.config.pad_token_id` set to match).
        """
        from ..modeling import load_base_model

        model, tokenizer = load_base_model(
            model_name_or_path, torch_dtype, auto_model_class=self.auto_model_class, **{**self.model_kwargs(), **kwargs}
        )
        self.tokenizer = tokenizer
        return model, tokenizer


TaskT = TypeVar("TaskT", bound=type[Task])

_REGISTRY: dict[str, type[Task]] = {}


def register_task(cls: TaskT) -> TaskT:
    """Class decorator: make a [`Task`] subclass buildable by its `name` with [`build_task`].

    ```py
    >>> @register_task
    ... class MyTask(Task):
    ...     name = "my_task"
    ...     ...
    ```

    Raises:
        `ValueError`: the class has no `name`, or another class is registered under it.
    """
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register_task expects a Task subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` class attribute to be registered")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"a task named {cls.name!r} is already registered ({existing.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def available_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(_REGISTRY)


def get_task_class(name: str) -> type[Task]:
    """The [`Task`] subclass registered as `name`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}") from None


def build_task(name: str, tokenizer: Optional[PreTrainedTokenizerBase] = None, **kwargs: Any) -> Task:
    """Build the task registered as `name`.

    Args:
        name (`str`): one of [`available_tasks`].
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the model's tokenizer (or set later by
            `task.load_model(...)`).
        kwargs: the [`Task`] arguments (`text_column`, `label_column`, `label_names`, `max_length`) and the task's
            own (e.g. `template` for `"category"`).

    Example:

    ```py
    >>> from fcmoe_hf.tasks import build_task
    >>> task = build_task("sequence_classification", label_names=splits.label_names, max_length=128)
    >>> model, tokenizer = task.load_model("minilm-l6")
    >>> model = get_peft_model(model, MoELoraConfig(task_type=task.task_type, num_experts=4, top_k=2))
    >>> train = task.tokenize(splits[0]["train"])  # batch with task.data_collator
    >>> task.evaluate(model, splits.global_test)
    {'accuracy': ..., 'precision': ..., 'recall': ..., 'f1': ...}
    ```
    """
    return get_task_class(name)(tokenizer, **kwargs)
