"""How visionq reaches hosts outside it: the SSRF guard every user-supplied URL goes through (netguard: image
fetches and webhook deliveries), and the S3 client (images, uploads, archived results)."""
