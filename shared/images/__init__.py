"""A job's images: references and their checks (refs), fetching over HTTPS and S3 (fetch), uploads, and hardened
decoding (decode)."""
