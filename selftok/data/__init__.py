"""Data: the image transform and suffix list (`images`), image sources (`sources`), token shards (`shards`)."""
