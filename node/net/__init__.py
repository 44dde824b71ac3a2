"""Network plumbing: the libp2p peer, gossip of offers and prices, framed streams and sessions."""
