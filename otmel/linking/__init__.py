"""The linking side: the sharded entity index, the linker (retrieve then rerank), link input and
output, mention detection, coherence, NIL calibration, image fetching. Never imports jobs or cluster."""
