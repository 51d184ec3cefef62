"""The system of record, in its own process: journal format, writer, store (schema, chain, verify), reports."""
