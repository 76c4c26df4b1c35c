"""A synthetic knowledge base, and the bits of it that a trained model stores.

Taught in ``notebooks/08_what_memory_remembers.ipynb``; the study that uses it is
``pkm_ref.capacity`` (``pkm-ref capacity``).

**The base.** ``KnowledgeBase.generate(n, seed)`` draws ``n`` individuals with distinct names
(first, middle and last name, each from a list of 40) and, for every individual and every
attribute, one value drawn uniformly and independently from the attribute's value set
(``ATTRIBUTES``: 12 birth months, 32 home cities, 16 fields of study, 24 occupations). Nothing is
downloaded; the same ``n`` and ``seed`` give the same base on every machine. Because every value
is an independent uniform draw, the information content of the base is exactly

    I = n · Σ_a log2 |V_a|  bits          (17.17 bits per individual with ``ATTRIBUTES``)

and no model can predict an individual's value better than ``log2 |V_a|`` bits of loss without
having stored something about that individual.

**Tokens.** One token per name part, per attribute and per value (``vocabulary``); a training
sequence is the name followed by every (attribute, value) pair in a random order,
``first middle last a₁ v₁ a₂ v₂ …`` (``3 + 2K`` tokens, one exposure of each of the K facts), and
the loss is taken on the value tokens only. A question is a name and one attribute,
``first middle last a`` (``questions``): the model's next-token distribution is its answer. A
byte-level text form (``biography``) writes the same facts as sentences from a few paraphrase
templates, to show what the compact form stands for; nothing here trains on it.

**Bits stored** (Allen-Zhu & Li, "Physics of Language Models: Part 3.3, Knowledge Capacity Scaling
Laws", arXiv 2404.05405, 2024). The paper bounds the bits a model must hold from its loss on the
attribute values: a model whose cross-entropy on a value drawn uniformly from ``V_a`` is ``L``
bits, for a value it could not guess, holds at least ``log2 |V_a| − L`` bits about it (it could
be used to encode the value in ``L`` bits instead of ``log2 |V_a|``). Summed over individuals,
per attribute, and floored at zero::

    bits_a = max(0, Σ_i (log2 |V_a| − L_{i,a}))          bits = Σ_a bits_a

``L_{i,a} = −log2 p(v_{i,a} | first middle last a)`` is the model's cross-entropy, in bits, on the
true value token, with the softmax over the whole vocabulary (the paper's loss on the value
tokens). The loss is an *excess* over that of a model which knows the base, which is 0 here:
each individual has exactly one value per attribute, so the base itself predicts it with
certainty. A model that knows nothing has ``L = log2 |V_a|`` at best (uniform over ``V_a``) and
stores 0 bits; one that puts probability 1 on every true value stores exactly ``I``. Recall is
the share of questions whose most likely next token is the true value.

What we follow and what we could not check: the paper's lower bound for its ``bioD`` data has
three terms, for the names (the model generates them), for the values, and for learning the value
vocabulary (values there are several tokens). Here the name is the question, never predicted, and
each value is a single token, so only the value term applies; that is the quantity above. The
formula is our reading of the paper; we could not consult its text while writing this, in
particular whether it floors the bound at zero per attribute or only overall. We floor per
attribute (each term is then still a valid lower bound: a model holds at least 0 bits about an
attribute), never per individual: a model that guesses one value per individual with some
confidence would get ``max(0, ·)`` credit for its lucky guesses and none of the blame for the
others, and so appear to store bits it does not have.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pkm_ref import _checks

# Name parts: 40 of each, 64,000 distinct full names.
FIRST_NAMES = (
    "Ada", "Alan", "Amara", "Anton", "Aria", "Bruno", "Carla", "Cyrus", "Dalia", "Dmitri",
    "Elena", "Emil", "Farah", "Felix", "Greta", "Hugo", "Ines", "Ivan", "Jana", "Jonas",
    "Kira", "Leon", "Lina", "Marco", "Maya", "Nadia", "Nils", "Omar", "Petra", "Quinn",
    "Rosa", "Samir", "Sofia", "Tariq", "Uma", "Victor", "Wanda", "Xavier", "Yara", "Zane",
)  # fmt: skip
MIDDLE_NAMES = (
    "Anne", "Beth", "Blake", "Claire", "Dean", "Eve", "Faye", "Grant", "Hope", "Ira",
    "Jay", "June", "Kai", "Lane", "Lee", "Lynn", "Mae", "Max", "Noel", "Paige",
    "Quincy", "Ray", "Reed", "Rose", "Ruth", "Sage", "Scott", "Tate", "Troy", "Vale",
    "Wade", "Wren", "Yves", "Zoe", "Bo", "Cole", "Drew", "Gale", "Jude", "Skye",
)  # fmt: skip
LAST_NAMES = (
    "Abbott", "Barros", "Castillo", "Dubois", "Eriksen", "Fischer", "Gallo", "Haddad",
    "Ito", "Jansen", "Kowalski", "Larsen", "Moreau", "Nakamura", "Okafor", "Petrov",
    "Quintero", "Rossi", "Schmidt", "Takahashi", "Ulrich", "Varga", "Weber", "Xu",
    "Yilmaz", "Zimmer", "Andersen", "Bianchi", "Costa", "Duarte", "Esposito", "Fontaine",
    "Garcia", "Horvat", "Ivanova", "Jovanovic", "Keller", "Lindqvist", "Mendes", "Novak",
)  # fmt: skip


@dataclass(frozen=True)
class Attribute:
    """A kind of fact: its name, its value set and the sentences that state it
    (``{name}`` and ``{value}`` are filled in)."""

    name: str
    values: tuple[str, ...]
    templates: tuple[str, ...]

    @property
    def bits(self) -> float:
        """log2 |V|: the information in one uniformly drawn value."""
        return math.log2(len(self.values))


ATTRIBUTES = (
    Attribute(
        "birth month",
        ("January", "February", "March", "April", "May", "June", "July", "August",
         "September", "October", "November", "December"),
        ("{name} was born in {value}.", "{name}'s birthday falls in {value}.",
         "{name} came into the world in {value}."),
    ),
    Attribute(
        "home city",
        ("Lisbon", "Oslo", "Cairo", "Lima", "Osaka", "Quito", "Dakar", "Hanoi",
         "Perth", "Kyiv", "Accra", "Bogota", "Delhi", "Tunis", "Riga", "Havana",
         "Manila", "Nairobi", "Porto", "Seoul", "Tbilisi", "Lyon", "Krakow", "Hobart",
         "Bergen", "Cusco", "Fez", "Goa", "Izmir", "Kobe", "Leeds", "Malmo"),
        ("{name} lives in {value}.", "{name} makes a home in {value}.",
         "{name}'s home is in {value}."),
    ),
    Attribute(
        "field of study",
        ("physics", "law", "biology", "history", "music", "economics", "chemistry",
         "medicine", "geology", "poetry", "statistics", "architecture", "linguistics",
         "astronomy", "philosophy", "nursing"),
        ("{name} studied {value}.", "{name} holds a degree in {value}.",
         "{name} majored in {value}."),
    ),
    Attribute(
        "occupation",
        ("baker", "pilot", "nurse", "tailor", "carpenter", "chemist", "dentist", "farmer",
         "judge", "lawyer", "miner", "painter", "plumber", "potter", "sailor", "surgeon",
         "teacher", "writer", "banker", "cook", "designer", "gardener", "jeweler", "librarian"),
        ("{name} works as a {value}.", "{name} earns a living as a {value}.",
         "By trade, {name} is a {value}."),
    ),
)  # fmt: skip


@dataclass(frozen=True, eq=False)  # tensor fields: compare bases by their seed and sizes
class KnowledgeBase:
    """N individuals, each with a distinct name and one value per attribute.

    ``names``: (N, 3) int64, indices into ``FIRST_NAMES``, ``MIDDLE_NAMES``, ``LAST_NAMES``.
    ``values``: (N, K) int64, ``values[i, a]`` indexes ``attributes[a].values``.
    Build one with ``KnowledgeBase.generate``.
    """

    names: torch.Tensor
    values: torch.Tensor
    attributes: tuple[Attribute, ...] = ATTRIBUTES
    name_parts: tuple[tuple[str, ...], ...] = (FIRST_NAMES, MIDDLE_NAMES, LAST_NAMES)

    @classmethod
    def generate(
        cls, n_individuals: int, seed: int = 0, attributes: Sequence[Attribute] = ATTRIBUTES
    ) -> KnowledgeBase:
        """``n_individuals`` distinct names and uniform, independent values, from ``seed``."""
        n = _checks.positive_int("n_individuals", n_individuals)
        parts = (FIRST_NAMES, MIDDLE_NAMES, LAST_NAMES)
        sizes = [len(p) for p in parts]
        possible = math.prod(sizes)
        if n > possible:
            raise ValueError(
                f"n_individuals={n} exceeds the {possible:,} distinct names the name lists make"
            )
        generator = torch.Generator().manual_seed(seed)
        drawn = torch.randperm(possible, generator=generator)[:n]  # (N,) distinct name codes
        names = torch.stack(  # (N, 3): mixed radix digits of the code
            [drawn // (sizes[1] * sizes[2]), drawn // sizes[2] % sizes[1], drawn % sizes[2]], dim=1
        )
        values = torch.stack(  # (N, K)
            [torch.randint(len(a.values), (n,), generator=generator) for a in attributes], dim=1
        )
        return cls(names, values, tuple(attributes), parts)

    def __post_init__(self) -> None:
        n = self.names.shape[0]
        if self.names.shape != (n, 3) or self.values.shape != (n, len(self.attributes)):
            raise ValueError(
                f"names must be (N, 3) and values (N, K={len(self.attributes)}), got "
                f"{tuple(self.names.shape)} and {tuple(self.values.shape)}"
            )

    # ------------------------------------------------------------------ information

    @property
    def n_individuals(self) -> int:
        return self.names.shape[0]

    @property
    def n_attributes(self) -> int:
        return len(self.attributes)

    def attribute_bits(self) -> list[float]:
        """Per attribute, the information in its N values: ``N · log2 |V_a|`` bits."""
        return [self.n_individuals * attribute.bits for attribute in self.attributes]

    def information_bits(self) -> float:
        """The information content of the base: ``N · Σ_a log2 |V_a|`` bits, exactly."""
        return math.fsum(self.attribute_bits())

    # ------------------------------------------------------------------ tokens

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """Every token as text: name parts, then ``<attribute>`` tokens, then the values."""
        words = [part for parts in self.name_parts for part in parts]
        words += [f"<{attribute.name}>" for attribute in self.attributes]
        return tuple(words + [v for attribute in self.attributes for v in attribute.values])

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    @property
    def sequence_length(self) -> int:
        """Tokens of a training sequence: 3 name parts and K (attribute, value) pairs."""
        return 3 + 2 * self.n_attributes

    def _name_offsets(self) -> torch.Tensor:
        sizes = torch.tensor([0] + [len(p) for p in self.name_parts[:-1]])  # (3,)
        return sizes.cumsum(0)  # (3,) first token of each name part

    def _first_attribute_token(self) -> int:
        return sum(len(p) for p in self.name_parts)

    def _value_offsets(self) -> torch.Tensor:
        first = self._first_attribute_token() + self.n_attributes
        sizes = torch.tensor([0] + [len(a.values) for a in self.attributes[:-1]])  # (K,)
        return first + sizes.cumsum(0)  # (K,) token of each attribute's first value

    def name_tokens(self, individuals: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3) name tokens of ``individuals`` (B,) (None: all, B = N)."""
        names = self.names if individuals is None else self.names[individuals]  # (B, 3)
        return names + self._name_offsets()  # (B, 3)

    def value_tokens(self, individuals: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) value tokens of ``individuals`` (B,) (None: all, B = N)."""
        values = self.values if individuals is None else self.values[individuals]  # (B, K)
        return values + self._value_offsets()  # (B, K)

    def training_batch(
        self, individuals: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences stating every fact of ``individuals`` (B,), attributes in a random order.

        Returns ``tokens`` (B, 3 + 2K) and ``targets`` (B, 3 + 2K): at each attribute token the
        next value, elsewhere -100 (ignored by the loss): the model learns values, not names.
        """
        batch = individuals.shape[0]
        order = torch.rand(batch, self.n_attributes, generator=generator).argsort(1)  # (B, K)
        tokens = torch.empty(batch, self.sequence_length, dtype=torch.long)  # (B, 3 + 2K)
        tokens[:, :3] = self.name_tokens(individuals)  # (B, 3)
        tokens[:, 3::2] = self._first_attribute_token() + order  # (B, K) attribute tokens
        tokens[:, 4::2] = self.value_tokens(individuals).gather(1, order)  # (B, K) their values
        targets = torch.full_like(tokens, -100)  # (B, 3 + 2K)
        targets[:, 3::2] = tokens[:, 4::2]  # predict each value at its attribute token
        return tokens, targets

    def questions(
        self, attribute: int, individuals: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Questions ``first middle last <attribute>`` (B, 4) and their answers (B,), the true
        value tokens, for ``individuals`` (B,) (None: all, B = N)."""
        names = self.name_tokens(individuals)  # (B, 3)
        asked = torch.full((names.shape[0], 1), self._first_attribute_token() + attribute)
        answers = self.value_tokens(individuals)[:, attribute]  # (B,)
        return torch.cat([names, asked], dim=1), answers  # (B, 4), (B,)

    def decode(self, tokens: torch.Tensor | Sequence[int]) -> str:
        """Tokens as words, separated by `` | ``."""
        words = self.vocabulary
        return " | ".join(words[int(t)] for t in tokens)

    # ------------------------------------------------------------------ text

    def name(self, individual: int) -> str:
        """The full name of ``individual``, e.g. ``"Ada Mae Okafor"``."""
        parts = zip(self.name_parts, self.names[individual].tolist(), strict=True)
        return " ".join(part[i] for part, i in parts)

    def facts(self, individual: int) -> dict[str, str]:
        """The attribute values of ``individual``, by attribute name."""
        return {
            a.name: a.values[int(v)]
            for a, v in zip(self.attributes, self.values[individual], strict=True)
        }

    def biography(self, individual: int, generator: torch.Generator | None = None) -> str:
        """The facts of ``individual`` as text: one sentence per attribute, in a random order,
        each from a randomly chosen paraphrase template (the byte-level form)."""
        order = torch.randperm(self.n_attributes, generator=generator).tolist()
        name, sentences = self.name(individual), []
        for a in order:
            attribute = self.attributes[a]
            template = attribute.templates[
                int(torch.randint(len(attribute.templates), (1,), generator=generator))
            ]
            value = attribute.values[int(self.values[individual, a])]
            sentences.append(template.format(name=name, value=value))
        return " ".join(sentences)


# ---------------------------------------------------------------------- measurement


def bits_from_losses(losses: torch.Tensor, value_counts: Sequence[int]) -> list[float]:
    """Bits stored per attribute, from the cross-entropies ``losses`` (N, K) in bits of the true
    values: ``max(0, Σ_i (log2 |V_a| − L_{i,a}))`` for each attribute ``a`` (module docstring).

    ``value_counts`` (K,): |V_a|. Summed in float64, so a model whose loss is exactly
    ``log2 |V_a|`` gets 0 to float precision and one whose loss is 0 gets ``N · log2 |V_a|``.
    """
    if losses.dim() != 2 or losses.shape[1] != len(value_counts):
        raise ValueError(f"losses must be (N, K={len(value_counts)}), got {tuple(losses.shape)}")
    totals = losses.double().sum(0)  # (K,) bits of loss per attribute
    n = losses.shape[0]
    return [
        max(0.0, n * math.log2(count) - float(total))
        for count, total in zip(value_counts, totals, strict=True)
    ]


@dataclass(frozen=True)
class Knowledge:
    """What a model knows of a base: bits stored and recall, per attribute and in all."""

    attribute_bits: tuple[float, ...]  # bits stored per attribute
    attribute_recall: tuple[float, ...]  # share of questions answered with the true value
    information_bits: float  # the base's information content, N · Σ log2 |V_a|

    @property
    def bits(self) -> float:
        """Bits stored, summed over the attributes."""
        return math.fsum(self.attribute_bits)

    @property
    def recall(self) -> float:
        """Share of all questions (every individual, every attribute) answered exactly."""
        return sum(self.attribute_recall) / len(self.attribute_recall)

    @property
    def fraction(self) -> float:
        """Bits stored as a share of the base's information content."""
        return self.bits / self.information_bits


_Model = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@torch.no_grad()
def value_losses(model: _Model, base: KnowledgeBase, batch_size: int = 4096) -> torch.Tensor:
    """The model's cross-entropy, in bits, on every true value: (N, K), from its logits
    ``model(questions)[0][:, -1]`` over the whole vocabulary (see ``measure``)."""
    return _answers(model, base, batch_size)[0]


def measure(model: _Model, base: KnowledgeBase, batch_size: int = 4096) -> Knowledge:
    """Ask ``model`` every question of ``base`` and count what it knows.

    ``model`` maps tokens (B, T) to ``(logits (B, T, vocab_size), ...)``, as
    ``pkm_ref.model.LanguageModel`` does; a ``torch.nn.Module`` is asked in eval mode (batchnorm
    queries then use their running averages) and put back in its previous mode. Questions go in
    batches of ``batch_size``.
    """
    losses, correct = _answers(model, base, batch_size)  # (N, K) each
    counts = [len(a.values) for a in base.attributes]
    return Knowledge(
        attribute_bits=tuple(bits_from_losses(losses, counts)),
        attribute_recall=tuple(float(c) for c in correct.double().mean(0)),
        information_bits=base.information_bits(),
    )


@torch.no_grad()
def _answers(
    model: _Model, base: KnowledgeBase, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses in bits (N, K) float64, correct (N, K) bool) of every question."""
    batch_size = _checks.positive_int("batch_size", batch_size)
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    try:
        device = _device_of(model)
        losses = torch.empty(base.n_individuals, base.n_attributes, dtype=torch.float64)
        correct = torch.empty(base.n_individuals, base.n_attributes, dtype=torch.bool)
        for a in range(base.n_attributes):
            for start in range(0, base.n_individuals, batch_size):
                individuals = torch.arange(start, min(start + batch_size, base.n_individuals))
                questions, answers = base.questions(a, individuals)  # (B, 4), (B,)
                logits = model(questions.to(device))[0][:, -1].double()  # (B, vocab), in float64
                loss = F.cross_entropy(logits, answers.to(device), reduction="none")  # (B,) nats
                losses[individuals, a] = loss.cpu() / math.log(2)
                correct[individuals, a] = (logits.argmax(-1) == answers.to(device)).cpu()
    finally:
        if was_training is not None:
            model.train(was_training)
    return losses, correct


def _device_of(model: _Model) -> torch.device:
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if parameters is not None else None
    return first.device if first is not None else torch.device("cpu")
