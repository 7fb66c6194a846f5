"""Data: the embedded corpus (:mod:`.corpus`), its tokenizer (:mod:`.tokenizer`), data specs
(:mod:`.sources`) and token streams (:mod:`.tokens`)."""
