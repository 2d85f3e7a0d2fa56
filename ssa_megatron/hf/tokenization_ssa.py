"""The training SentencePiece model as a transformers tokenizer (copied next to converted weights).

Encodes with sentencepiece itself (so ids equal the ones the training data was built with) and
decodes whole piece sequences through sentencepiece, byte-fallback pieces included.
"""
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class SSASentencePieceTokenizer(SentencePieceBackend):
    """SentencePiece ``tokenizer.model``, no BOS/EOS added unless asked (as in pretraining)."""

    def convert_tokens_to_string(self, tokens) -> str:
        return self.sp_model.decode_pieces(list(tokens))
