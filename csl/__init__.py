"""Confidence Separable Learning (ICCV 2025): the CSL selector and its masking view."""
