"""The image builder (Bottlerocket's buildsys + rpm2img): Debian packages in, A/B disk out."""
