"""lepton_fast.tasks.sentiment.text: tokeniser, hashing, text views, the fastText-style model, the lexicon teacher."""
import pytest
import torch

from lepton_fast.tasks.sentiment.text import (PAD, HashedNgramClassifier, HashedNgrams, LexiconTeacher, encode, strong_text_view,
                              token_hash, tokenize, weak_text_view, word_dropout, word_swap)

LEXICON = {"good": 1.9, "great": 3.1, "bad": -2.5, "awful": -2.0, "no": -1.2, ":)": 2.0}


def test_tokenize():
    assert tokenize("It doesn't WORK -- well-made?! 3.5 stars") == [
        "it", "doesn't", "work", "well-made", "?", "!", "3", "5", "stars"]
    assert tokenize("it\u2019s") == ["it's"]
    with pytest.raises(TypeError, match="text"):
        tokenize(3)


def test_token_hash_is_stable_and_never_padding():
    assert token_hash("good") == 1820610195  # crc32: the same in every process and version
    assert all(1 <= token_hash(t) < 2**31 for t in ("", "a", "good", "x" * 100))


def test_encode_pads_and_truncates():
    x = encode(["good movie", "", "a b c d e"], max_len=4)
    assert x.dtype == torch.int64 and x.shape == (3, 4)
    assert x[0].tolist() == [token_hash("good"), token_hash("movie"), PAD, PAD]
    assert (x[1] == PAD).all() and (x[2] != PAD).all()
    with pytest.raises(TypeError, match="texts"):
        encode("one string")
    with pytest.raises(ValueError, match="max_len"):
        encode(["a"], max_len=1)


def _ids(n=50, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 2**31 - 1, (n, length), generator=g)
    lengths = torch.randint(1, length + 1, (n, 1), generator=g)
    return torch.where(torch.arange(length) < lengths, x, PAD)


def test_word_dropout_keeps_order_and_at_least_one_word():
    x = _ids()
    out = word_dropout(x, torch.Generator().manual_seed(1), p=0.5)
    assert out.shape == x.shape and out.dtype == torch.int64
    for row_in, row_out in zip(x.tolist(), out.tolist()):
        kept = [t for t in row_out if t != PAD]
        assert 1 <= len(kept) and row_out[len(kept):] == [PAD] * (len(row_out) - len(kept))  # words first
        it = iter(row_in)
        assert all(t in it for t in kept)  # a subsequence: order kept
    again = word_dropout(x, torch.Generator().manual_seed(1), p=0.5)
    assert torch.equal(out, again)  # reproducible from the generator
    assert torch.equal(word_dropout(x, p=0.0), x)
    with pytest.raises(ValueError, match="p must be"):
        word_dropout(x, p=1.0)
    with pytest.raises(ValueError, match="x must be int64"):
        word_dropout(x.float())


def test_word_swap_permutes_neighbours_only():
    x = _ids()
    out = word_swap(x, torch.Generator().manual_seed(2), p=1.0)
    assert torch.equal(out.sort(1).values, x.sort(1).values)  # the same words
    assert torch.equal(out == PAD, x == PAD)  # padding stays where it was
    assert not torch.equal(out, x)
    assert torch.equal(word_swap(x, p=0.0), x)


def test_views_take_a_generator_and_keep_shape():
    x = _ids()
    for view in (weak_text_view, strong_text_view):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(view(x, g1), view(x, g2)) and view(x, g1).shape == x.shape


def test_hashed_ngrams_ids_and_padding():
    bag = HashedNgrams(buckets=1000, dim=4, ngrams=2)
    x = torch.tensor([[5, 7, 0, 0], [0, 0, 0, 0]])
    ids = bag.ids(x)
    assert ids.shape == (2, 4 + 3)
    assert (ids[1] == 0).all()
    assert (ids[0, :2] > 0).all() and (ids[0, 2:4] == 0).all()
    assert (ids[0, 4] > 0) and (ids[0, 5:] == 0).all()  # one bigram, (5, 7)
    assert ids.max() < 1000
    assert torch.equal(bag(x)[1], torch.zeros(4))  # padding alone: zero features
    with pytest.raises(ValueError, match="buckets"):
        HashedNgrams(buckets=1)


def test_classifier_shapes_split_and_sparse_gradients():
    model = HashedNgramClassifier(num_classes=2, buckets=2**12, dim=8)
    x = encode(["good movie", "bad product, no"])
    logits = model(x)
    assert logits.shape == (2, 2) and logits.dtype == torch.float32
    assert torch.equal(model.classifier(model.features(x)), logits)
    assert model.feature_dim == 8
    logits.sum().backward()
    assert model.features[0].bag.weight.grad.is_sparse  # sparse rows: Adagrad/SGD/SparseAdam
    with pytest.raises(ValueError, match="x must be int64"):
        model(x.float())


def _p_positive(teacher, texts):
    return torch.softmax(teacher(encode(texts)), -1)[:, 1]


def test_lexicon_teacher_follows_vader_rules():
    t = LexiconTeacher(LEXICON)
    p = _p_positive(t, ["good", "not good", "very good", "it was good", "nothing here", "good but awful",
                        "good!!", "no good", "no"])
    good, not_good, very_good, it_good, none, but, bang, no_good, no = p.tolist()
    assert good > 0.5 and not_good < 0.5 and very_good > good and it_good == pytest.approx(good)
    assert none == pytest.approx(0.5) and but < 0.5 and bang > good
    assert no_good < 0.5 and no < 0.5
    c = t.compound(encode(["good"]))
    assert c.item() == pytest.approx(1.9 / (1.9**2 + 15) ** 0.5)  # VADER's normalisation
    assert not any(True for _ in t.parameters())
    with pytest.raises(ValueError, match="lexicon"):
        LexiconTeacher({})
    with pytest.raises(ValueError, match="scale"):
        LexiconTeacher(LEXICON, scale=0.0)
