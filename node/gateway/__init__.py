"""The gateway role: the OpenAI API, the relay to hosts, settlement with the hub, and the challenger."""
