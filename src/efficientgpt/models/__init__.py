"""Loading causal LMs (:mod:`.loading`), the embedded default (:mod:`.embedded`), role tables
(:mod:`.arch`) and tiny test models (:mod:`.tiny`)."""
