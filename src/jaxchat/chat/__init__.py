"""The chat half: conversations, the compiled decode engine, the calculator tool, `jaxchat chat`, `jaxchat serve`
and `jaxchat sft` (docs/chat.md)."""
