"""`Library`'s model and encoders: which model it embeds with, loading only the towers a call needs, and what runs
each tower (ONNX Runtime or torch), down to the choice a one-shot text query makes to start without torch.

Mixed into `clipsearch.library.Library`.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from retrieval.model.query_text import (
    FEW_TEXTS,
    encode_onnx_query_texts,
    encode_query_texts,
    export_text_tower,
    onnx_text_encoder,
    query_text_model,
    warn_if_cut,
)

if TYPE_CHECKING:
    from pathlib import Path

    from retrieval.model.clip import CLIP
    from retrieval.model.encode import Encoder
    from retrieval.model.identity import ModelInfo
    from retrieval.model.onnx_runtime import OnnxEncoder
    from retrieval.model.preprocess import Preprocess
    from retrieval.types import Embeddings

# Query texts whose vectors are kept, the latest used: every page of results after the first (the web app's
# infinite scroll, an API client paging) asks for the same text again, and encoding it is most of a text search.
TEXT_CACHE = 256


def default_model_for(db: str | os.PathLike[str] | None) -> str:
    """The model to use when none is named: `$CLIPSEARCH_MODEL`, else the store's only registered model, else
    the registry default (MobileCLIP2-S0)."""
    from retrieval.ann import saved_models
    from retrieval.model.registry import default_model_name, is_registered

    if os.environ.get("CLIPSEARCH_MODEL"):
        return os.environ["CLIPSEARCH_MODEL"]
    models = saved_models(db) if db is not None else None  # answers without importing LanceDB when it can
    if models is None:
        from retrieval.store import Store

        models = [m.model for m in Store.models(db)]
    names = {m.name for m in models if is_registered(m.name)}
    return names.pop() if len(names) == 1 else default_model_name()


class EncoderMethods:
    """The model half of `Library`: its name and identity, its towers, and the encoders that run them."""

    db: Path

    def _init_encoders(
        self,
        model: str | os.PathLike[str] | CLIP | None,
        device: str,
        text_precision: str,
        precision: str,
        runtime: str,
    ) -> None:
        """Remember the model asked for and how to run it; nothing loads yet."""
        self.device = device
        self.text_precision = text_precision
        self.precision = precision
        self.runtime = runtime
        self._encoders: dict[str, Encoder] = {}
        self._given_model = model if model is not None and not isinstance(model, str | os.PathLike) else None
        if self._given_model is not None and getattr(self._given_model, "info", None) is None:
            raise ValueError(
                "a model passed in needs `.info` to match it with a store: load it with `load_model`, or set "
                "`model.info = ModelInfo.for_model(model, name)`"
            )
        self._model_name = None if self._given_model is not None or model is None else os.fspath(model)
        self._models: dict[str, tuple[CLIP, Preprocess]] = {}
        self._query_text_model: CLIP | None = None
        self._onnx_text: OnnxEncoder | None = None
        self._onnx_looked_for = False
        self._stored: ModelInfo | None = None
        self._stored_read = False
        self._text_vectors: OrderedDict[str, np.ndarray] = OrderedDict()  # text -> its unit vector (`TEXT_CACHE`)

    @property
    def model_name(self) -> str:
        """The name or path of the model this library embeds with."""
        if self._given_model is not None:
            return self._given_model.info.name
        if self._model_name is None:
            self._model_name = default_model_for(self.db)
        return self._model_name

    def _model(self, towers: str) -> tuple[CLIP, Preprocess]:
        """The model with (at least) the tower asked for: "text" or "image"."""
        if self._given_model is not None:
            from retrieval.model.preprocess import Preprocess

            return self._given_model, Preprocess.from_config(self._given_model.config)
        if towers not in self._models:
            from retrieval.model.loading import load_model

            self._models[towers] = load_model(self.model_name, device=self.device, towers=towers)
        return self._models[towers]

    @property
    def model_info(self) -> ModelInfo:
        """The identity of the model's embedding space: a loaded tower's, else the store's record of it when that
        can be read without torch (`_stored_info`), else the text tower's (loading it)."""
        if not self._models and self._given_model is None and self.precision == "float32":
            stored = self._stored_info()
            if stored is not None:
                return stored
        model, _ = next(iter(self._models.values())) if self._models else self._model("text")
        return dataclasses.replace(model.info, precision=self.precision)

    def _encoder(self, towers: str) -> Encoder:
        """What runs the model's "image" or "text" tower (`choose_encoder`: ONNX Runtime on a CPU)."""
        if towers not in self._encoders:
            from retrieval.model.encode import choose_encoder

            model = self._model(towers)[0]
            self._encoders[towers] = choose_encoder(model, towers, self.precision, self.runtime)
        return self._encoders[towers]

    def _stored_info(self) -> ModelInfo | None:
        """The identity the store's saved index records for this library's model, read without torch: only for a
        registry model whose (name, weights hash) is known before it loads (`known_identity`), and only while every
        table's saved index is current (`saved_tables`); else None."""
        if not self._stored_read:
            from retrieval.ann import saved_tables
            from retrieval.model.registry import known_identity

            self._stored_read = True
            identity = known_identity(self.model_name)
            tables = saved_tables(self.db) if identity is not None and self.db.is_dir() else None
            for model, _ in tables or []:
                float32 = getattr(model, "precision", "float32") == "float32"  # an int8 table is another space
                if (model.name, model.weights_sha256) == identity and float32:
                    self._stored = model
        return self._stored

    def _onnx_text_encoder(self, texts: int) -> OnnxEncoder | None:
        """For a one-shot library (`text_precision="float32"`) that has no torch text tower loaded and was given no
        model: the text tower of a fresh ONNX export of the model (`onnx_text_encoder`), looked for once; None means
        torch."""
        one_shot = self.text_precision == "float32" and self._given_model is None and self.precision == "float32"
        if not self._onnx_looked_for and self._query_text_model is None and one_shot:
            self._onnx_looked_for = True
            self._onnx_text = onnx_text_encoder(self.model_info, texts)
        return self._onnx_text

    def _encode_texts(self, batch: list[str]) -> Embeddings:
        """Embed a query's texts (`_encode_texts_now`), the vectors of the last `TEXT_CACHE` query texts kept; sets of
        more than `FEW_TEXTS` (class prompts, ensembles) are not kept."""
        if len(batch) > FEW_TEXTS:
            return self._encode_texts_now(batch)
        kept = [self._text_vectors.get(text) for text in batch]
        if all(vector is not None for vector in kept):
            for text in batch:
                self._text_vectors.move_to_end(text)
            return np.stack(kept)
        vectors = self._encode_texts_now(batch)
        for text, vector in zip(batch, vectors, strict=True):
            self._text_vectors[text] = vector.copy()
            self._text_vectors.move_to_end(text)
        while len(self._text_vectors) > TEXT_CACHE:
            self._text_vectors.popitem(last=False)
        return vectors

    def _encode_texts_now(self, batch: list[str]) -> Embeddings:
        """Embed a query's texts with the cheapest encoder at hand: a fresh export without torch (one-shot), else the
        query text model (bfloat16 where native), else the model's `choose_encoder` text encoder.

        The export the next one-shot query runs from is made where the encoder is chosen (`choose_encoder`), once;
        only a model that `choose_encoder` keeps in torch (on a GPU, or `runtime="torch"`) is exported here.
        """
        encoder = self._onnx_text_encoder(len(batch))
        if encoder is not None:
            return encode_onnx_query_texts(encoder, batch)
        first = self._query_text_model is None
        if first:
            model = self._model("text")[0]
            bfloat16_ok = self.text_precision == "auto" and self.precision == "float32"
            self._query_text_model = query_text_model(model) if bfloat16_ok else model
        model = self._query_text_model
        if model.config.family != "siglip":  # the count is CLIP's tokenizer's (MobileCLIP's too)
            warn_if_cut(batch, model.config.text.context_length)
        if model is self._model("text")[0]:  # not the bfloat16 copy a CPU with native bfloat16 gets
            from retrieval.model.encode import model_device
            from retrieval.model.onnx_runtime import OnnxEncoder

            encoder = self._encoder("text")
            if isinstance(encoder, OnnxEncoder):
                return encoder.encode_texts(np.asarray(model.tokenize(batch)))
            one_shot = self.text_precision == "float32" and self._given_model is None and self.precision == "float32"
            kept_in_torch = self.runtime == "torch" or model_device(model).type != "cpu"  # not exported by choice
            if first and one_shot and kept_in_torch:
                export_text_tower(model)  # the next one-shot query then runs without torch
        return encode_query_texts(model, batch)
