"""A faithful, fast PyTorch reference implementation of the Llama 3 family."""
from llama.generation import ChatPrediction, CompletionPrediction, Llama, StreamToken
from llama.model import ModelArgs, Transformer
from llama.tokenizer import ChatFormat, Dialog, Message, Tokenizer

__all__ = [
    "Llama",
    "ModelArgs",
    "Transformer",
    "Tokenizer",
    "ChatFormat",
    "Dialog",
    "Message",
    "CompletionPrediction",
    "ChatPrediction",
    "StreamToken",
]
