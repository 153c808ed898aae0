"""Contract tests: mlaprop plans against the installed SGLang's own argument pipeline."""
