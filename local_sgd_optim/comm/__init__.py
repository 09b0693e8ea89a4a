"""How tensors move between ranks: buckets, the averager, the round header, collectives."""
