"""The write path: walk folders, decode images, batch them through the image encoder, write to the store."""
