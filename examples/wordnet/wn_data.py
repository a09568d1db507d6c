"""WordNet 3.0 as a retrieval task: example sentences (queries) -> synsets (targets).

Reads the Debian ``wordnet-base`` database files (``data.noun``, ``data.verb``,
``data.adj``, ``data.adv`` under ``/usr/share/wordnet``), in the WordNet 3.0
database format: one synset per line, ``offset lex_filenum ss_type w_cnt
word lex_id ... p_cnt pointers... [frames] | gloss``. The gloss is the
definition followed by ``; "example"`` parts.

- A target is a synset, written as its lemmas and its definition (the gloss
  without the quoted examples).
- A query is one quoted example sentence, whose positive is its synset.

Texts become hashed n-gram features (word unigrams, word bigrams, word
prefixes), stored as one CSR matrix per corpus. The hash is
CRC-32, so features are the same in every process.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from typing import Dict, List, Sequence, Tuple

import numpy as np

WORDNET_DIR = "/usr/share/wordnet"
POS_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_QUOTED = re.compile(r'"([^"]*)"')
_TOKEN = re.compile(r"[a-z0-9]+")


@dataclasses.dataclass
class WordNet:
    """The parsed corpus.

    Attributes:
        target_texts: one text per synset (lemmas, then the definition).
        synset_keys: "<pos>:<offset>" per synset, same order.
        query_texts: one text per example sentence.
        query_target: the row of each query's synset in ``target_texts``.
    """

    target_texts: List[str]
    synset_keys: List[str]
    query_texts: List[str]
    query_target: np.ndarray


def load_wordnet(wordnet_dir: str = WORDNET_DIR) -> WordNet:
    """Parses the four data files into targets and queries.

    Raises:
        FileNotFoundError: a data file is missing (install Debian's
            ``wordnet-base``).
        ValueError: a line does not follow the database format.
    """
    target_texts: List[str] = []
    keys: List[str] = []
    query_texts: List[str] = []
    query_target: List[int] = []
    for name in POS_FILES:
        path = os.path.join(wordnet_dir, name)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} is missing: install the Debian package wordnet-base")
        with open(path, encoding="latin-1") as f:
            for lineno, line in enumerate(f, 1):
                if line.startswith("  "):  # the license header
                    continue
                head, sep, gloss = line.partition("|")
                if not sep:
                    raise ValueError(f"{path}:{lineno}: no '|' before the gloss")
                fields = head.split()
                try:
                    w_cnt = int(fields[3], 16)
                    lemmas = [fields[4 + 2 * i] for i in range(w_cnt)]
                except (IndexError, ValueError) as e:
                    raise ValueError(f"{path}:{lineno}: bad synset header: {e}") from e
                examples = [q.strip() for q in _QUOTED.findall(gloss)]
                definition = _QUOTED.sub(" ", gloss)
                definition = re.sub(r"[;\s]+$", "", re.sub(r"\s*;\s*(;\s*)+", "; ", definition)).strip()
                definition = definition.rstrip("; ").strip()
                words = ", ".join(re.sub(r"\(.*\)$", "", l).replace("_", " ") for l in lemmas)
                row = len(target_texts)
                target_texts.append(f"{words}: {definition}")
                keys.append(f"{fields[2]}:{fields[0]}")
                for q in examples:
                    if q:
                        query_texts.append(q)
                        query_target.append(row)
    return WordNet(target_texts, keys, query_texts, np.asarray(query_target, np.int64))


@dataclasses.dataclass
class Split:
    """Row indices into ``WordNet.query_texts``: train, validation (carved out of
    the train share, for choosing hyperparameters) and held out."""

    train: np.ndarray
    val: np.ndarray
    heldout: np.ndarray


def split_queries(num_queries: int, seed: int = 0, heldout_frac: float = 0.2,
                  val_frac_of_train: float = 0.1) -> Split:
    """A fixed random split of the queries: ``heldout_frac`` held out, and
    ``val_frac_of_train`` of the rest as a validation split."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_queries)
    n_held = int(round(heldout_frac * num_queries))
    heldout, train = perm[:n_held], perm[n_held:]
    n_val = int(round(val_frac_of_train * len(train)))
    return Split(train=np.sort(train[n_val:]), val=np.sort(train[:n_val]),
                 heldout=np.sort(heldout))


def tokenize(text: str) -> List[str]:
    """Lower-cased alphanumeric tokens."""
    return _TOKEN.findall(text.lower())


def _h(s: str, buckets: int) -> int:
    return zlib.crc32(s.encode()) % buckets


def featurize(texts: Sequence[str], buckets: int, max_features: int = 128
              ) -> Tuple[np.ndarray, np.ndarray]:
    """Hashed n-gram features of each text, as CSR (indptr [n+1], indices).

    Features: each word, its 3- and 5-letter prefixes (a crude stemmer:
    "rally" and "rallying" share two of three), and each pair of adjacent
    words. At most
    ``max_features`` per text (the first ones: lemmas come first in a target).
    """
    word_cache: Dict[str, List[int]] = {}
    indptr = np.zeros(len(texts) + 1, np.int64)
    chunks: List[np.ndarray] = []
    for i, text in enumerate(texts):
        toks = tokenize(text)
        feats: List[int] = []
        for j, t in enumerate(toks):
            wf = word_cache.get(t)
            if wf is None:
                wf = [_h("w " + t, buckets)] + [
                    _h(f"p{n} " + t[:n], buckets) for n in (3, 5) if len(t) > n]
                word_cache[t] = wf
            feats.extend(wf)
            if j > 0:
                feats.append(_h(f"b {toks[j - 1]} {t}", buckets))
        if not feats:
            feats = [_h("<empty>", buckets)]
        feats = feats[:max_features]
        chunks.append(np.asarray(feats, np.int64))
        indptr[i + 1] = indptr[i] + len(feats)
    return indptr, np.concatenate(chunks)


def subset(wn: WordNet, num_targets: int, seed: int = 0) -> WordNet:
    """A smaller task for smoke runs: ``num_targets`` synsets, those with
    examples first, and their queries; targets renumbered 0..n-1."""
    rng = np.random.default_rng(seed)
    has_q = np.unique(wn.query_target)
    no_q = np.setdiff1d(np.arange(len(wn.target_texts)), has_q)
    n_with = min(len(has_q), num_targets // 2)
    keep = np.concatenate([rng.choice(has_q, n_with, replace=False),
                           rng.choice(no_q, num_targets - n_with, replace=False)])
    keep = np.sort(keep)
    remap = -np.ones(len(wn.target_texts), np.int64)
    remap[keep] = np.arange(len(keep))
    qmask = remap[wn.query_target] >= 0
    qrows = np.nonzero(qmask)[0]
    return WordNet([wn.target_texts[i] for i in keep], [wn.synset_keys[i] for i in keep],
                   [wn.query_texts[i] for i in qrows], remap[wn.query_target[qrows]])
