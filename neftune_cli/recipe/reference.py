"""The README's recipe reference, generated from the schema so the two cannot drift apart."""

from __future__ import annotations

import json

from pydantic import BaseModel

from neftune_cli.recipe.schema import Recipe, section_model


def reference_markdown() -> str:
    """The README's recipe reference, generated from the schema so the two cannot drift apart."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            sub = section_model(model, name)
            is_list = sub is not None and "list" in str(field.annotation)
            if sub is not None:
                if field.description:
                    lines.append(f"| `{key}` | | {field.description} |")
                walk(sub, f"{key}[]." if is_list else f"{key}.")
                continue
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = f"`{json.dumps(value.model_dump() if isinstance(value, BaseModel) else value)}`"
            lines.append(f"| `{key}` | {default} | {(field.description or '').replace('|', '/')} |")

    walk(Recipe, "")
    return "\n".join(lines) + "\n"
