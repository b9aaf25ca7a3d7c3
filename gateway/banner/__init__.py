"""The consent banner: markup, texts and assets shipped as package data, injected into HTML responses."""

from __future__ import annotations

from gateway.banner.inject import Banner, next_path, wrap_send
from gateway.banner.texts import BannerTexts, LanguageChooser, parse_accept_language

__all__ = ["Banner", "BannerTexts", "LanguageChooser", "next_path", "parse_accept_language", "wrap_send"]
