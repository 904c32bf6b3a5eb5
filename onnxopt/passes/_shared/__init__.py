"""What two or more pass families use: activation capture, sessions, scoring, timing, surgery.

Modules here import nothing from a pass family, so any family may import them.
"""
