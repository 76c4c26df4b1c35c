"""The synthetic knowledge base and the bits measurement: exact on models whose knowledge is
known (a lookup table stores everything, a uniform guess nothing, one attribute only its bits)."""

import math

import pytest
import torch
from torch import nn

from pkm_ref.knowledge import ATTRIBUTES, KnowledgeBase, bits_from_losses, measure

BITS_PER_INDIVIDUAL = math.log2(12 * 32 * 16 * 24)  # the value-set sizes of ATTRIBUTES


class Oracle(nn.Module):
    """A "model" that answers questions from a table: for every attribute in ``known`` it puts
    all its probability on the true value; for the others it is uniform over ``guess``
    ("values": the attribute's value set, "vocabulary": every token)."""

    def __init__(self, base: KnowledgeBase, known: set[int], guess: str = "values"):
        super().__init__()
        self.base, self.known, self.guess = base, known, guess
        self.table = {tuple(n.tolist()): i for i, n in enumerate(base.name_tokens())}
        self.scale = nn.Parameter(torch.ones(()))  # so that measure() finds a device and a mode

    def forward(self, tokens: torch.Tensor):
        batch, length = tokens.shape
        logits = torch.zeros(batch, length, self.base.vocab_size)  # (B, T, V): uniform
        first_attribute = self.base.vocabulary.index(f"<{self.base.attributes[0].name}>")
        for row, question in enumerate(tokens):
            individual = self.table[tuple(question[:3].tolist())]
            attribute = int(question[3]) - first_attribute
            value = int(self.base.value_tokens(torch.tensor([individual]))[0, attribute])
            if attribute in self.known:
                logits[row, -1] = -math.inf
                logits[row, -1, value] = 0.0
            elif self.guess == "values":
                offset = value - int(self.base.values[individual, attribute])  # first value
                size = len(self.base.attributes[attribute].values)
                logits[row, -1] = -math.inf
                logits[row, -1, offset : offset + size] = 0.0
        return logits, None


@pytest.fixture(scope="module")
def base():
    return KnowledgeBase.generate(50, seed=3)


def test_information_content_is_exactly_the_sum_of_the_value_entropies(base):
    assert base.information_bits() == pytest.approx(50 * BITS_PER_INDIVIDUAL, rel=1e-15)
    assert base.attribute_bits() == [50 * math.log2(len(a.values)) for a in ATTRIBUTES]


def test_the_base_is_deterministic_with_distinct_names_and_values_in_range(base):
    again = KnowledgeBase.generate(50, seed=3)
    assert torch.equal(base.names, again.names) and torch.equal(base.values, again.values)
    assert not torch.equal(base.values, KnowledgeBase.generate(50, seed=4).values)
    assert len({tuple(n) for n in base.names.tolist()}) == 50
    for a, attribute in enumerate(ATTRIBUTES):
        assert (
            0
            <= int(base.values[:, a].min())
            <= int(base.values[:, a].max())
            < len(attribute.values)
        )
    with pytest.raises(ValueError, match="64,000 distinct names"):
        KnowledgeBase.generate(64_001)


def test_a_training_sequence_states_every_fact_once_and_scores_only_the_values(base):
    individuals = torch.tensor([4, 0, 7])
    tokens, targets = base.training_batch(individuals, torch.Generator().manual_seed(0))
    assert tokens.shape == targets.shape == (3, 3 + 2 * len(ATTRIBUTES))
    words = base.vocabulary
    for row, individual in enumerate(individuals.tolist()):
        assert " ".join(words[t] for t in tokens[row, :3]) == base.name(individual)
        stated = {
            words[a][1:-1]: words[v]
            for a, v in zip(tokens[row, 3::2], tokens[row, 4::2], strict=True)
        }
        assert stated == base.facts(individual)
        scored = targets[row] != -100
        assert scored.nonzero().flatten().tolist() == [3, 5, 7, 9]  # at each attribute token
        assert torch.equal(targets[row, scored], tokens[row, 4::2])  # the next token: its value


def test_questions_ask_for_one_attribute_and_know_the_answer(base):
    questions, answers = base.questions(2, torch.tensor([5]))
    assert base.decode(questions[0]) == f"{base.name(5).replace(' ', ' | ')} | <field of study>"
    assert base.decode(answers) == base.facts(5)["field of study"]


def test_the_biography_states_every_fact_in_words(base):
    text = base.biography(1, torch.Generator().manual_seed(0))
    assert text.count(base.name(1)) == len(ATTRIBUTES)
    assert all(value in text for value in base.facts(1).values())


def test_a_lookup_table_stores_exactly_the_information_of_the_base(base):
    knowledge = measure(Oracle(base, known={0, 1, 2, 3}), base)
    assert knowledge.bits == pytest.approx(base.information_bits(), rel=1e-12)
    assert knowledge.recall == 1.0 and knowledge.fraction == pytest.approx(1.0, rel=1e-12)


def test_a_uniform_guess_stores_nothing(base):
    over_the_vocabulary = measure(Oracle(base, known=set(), guess="vocabulary"), base)
    assert over_the_vocabulary.bits == 0.0  # worse than uniform over the values: floored
    over_the_values = measure(Oracle(base, known=set(), guess="values"), base)
    assert over_the_values.bits == pytest.approx(0.0, abs=1e-9)


def test_knowing_one_attribute_stores_exactly_its_bits(base):
    knowledge = measure(Oracle(base, known={1}), base)
    assert knowledge.bits == pytest.approx(50 * math.log2(32), rel=1e-12)
    assert knowledge.attribute_bits[1] == pytest.approx(50 * 5.0, rel=1e-12)
    assert [b for a, b in enumerate(knowledge.attribute_bits) if a != 1] == pytest.approx(
        [0, 0, 0], abs=1e-9
    )
    assert knowledge.attribute_recall[1] == 1.0


def test_a_known_attribute_keeps_its_bits_beside_attributes_worse_than_uniform(base):
    """Floored once over all attributes, the three attributes guessed over the whole vocabulary
    (worse than uniform over their values) would cancel the 250 bits of the known one."""
    knowledge = measure(Oracle(base, known={1}, guess="vocabulary"), base)
    assert knowledge.attribute_bits == pytest.approx((0, 50 * 5.0, 0, 0), abs=1e-9)
    assert knowledge.bits == pytest.approx(50 * math.log2(32), rel=1e-12)


def test_bits_are_floored_per_attribute_not_per_individual():
    """Half the individuals answered with certainty, half with twice the uniform loss: no net
    knowledge of the attribute (0 bits), though each lucky answer alone looks like 2 bits."""
    losses = torch.tensor([[0.0], [4.0], [0.0], [4.0]])  # (N=4, K=1), |V| = 4: 2 bits each
    assert bits_from_losses(losses, [4]) == [0.0]
    assert bits_from_losses(torch.tensor([[0.0], [1.0]]), [4]) == [3.0]  # 2 + 1 bits
    with pytest.raises(ValueError, match="losses must be"):
        bits_from_losses(losses, [4, 8])


def test_measure_leaves_the_model_in_its_mode(base):
    oracle = Oracle(base, known={0})
    measure(oracle, base, batch_size=7)  # several batches
    assert oracle.training
    oracle.eval()
    measure(oracle, base)
    assert not oracle.training
