"""Read an nftables rule set as text, enough to check the appliance's policy.

/etc/nftables.conf is what nftables.service loads at boot; the checks read that
text (the image is not running). The parser understands the shape the harden
role writes: `table <family> <name> { chain <name> { type ... policy ...; rules } }`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class Chain:
    name: str
    hook: str = ""
    policy: str = ""
    rules: list[str] = field(default_factory=list)

    def accepts(self) -> list[str]:
        return [r for r in self.rules if re.search(r"\baccept\b", r)]

    def ports(self, proto: str) -> set[int]:
        """Destination ports of `proto` that an accept rule opens."""
        found: set[int] = set()
        for rule in self.accepts():
            if re.search(rf"\b{proto}\s+sport\b", rule):
                continue  # DHCP-like pairs (sport + dport) are checked on their own
            match = re.search(rf"\b{proto}\s+dport\s+(\{{[^}}]*\}}|\S+)", rule)
            if match:
                found |= _port_set(match.group(1))
        return found


def _port_set(text: str) -> set[int]:
    text = text.strip("{} ")
    ports: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if "-" in part:
            low, high = part.split("-", 1)
            ports |= set(range(int(low), int(high) + 1))
        elif part:
            ports.add(int(part))
    return ports


def _strip_comments(text: str) -> str:
    lines = []
    for line in text.splitlines():
        # A '#' starts a comment unless it sits inside a quoted string.
        out, quoted = [], False
        for ch in line:
            if ch == '"':
                quoted = not quoted
            if ch == "#" and not quoted:
                break
            out.append(ch)
        lines.append("".join(out))
    return "\n".join(lines)


def parse(text: str) -> dict[str, Chain]:
    """Chains of the rule set by name; rules without their `comment "..."`."""
    text = _strip_comments(text)
    chains: dict[str, Chain] = {}
    for match in re.finditer(r"\bchain\s+(\S+)\s*\{", text):
        name, start, depth, pos = match.group(1), match.end(), 1, match.end()
        while depth and pos < len(text):
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            pos += 1
        body = text[start:pos - 1]
        chain = Chain(name)
        for statement in re.split(r"[;\n]", body):
            statement = re.sub(r'\s+comment\s+"[^"]*"', "", statement).strip()
            if not statement:
                continue
            if statement.startswith("type "):
                hook = re.search(r"\bhook\s+(\S+)", statement)
                chain.hook = hook.group(1) if hook else ""
            elif statement.startswith("policy "):
                chain.policy = statement.split()[1]
            else:
                chain.rules.append(" ".join(statement.split()))
        chains[name] = chain
    return chains


def by_hook(chains: dict[str, Chain], hook: str) -> list[Chain]:
    return [c for c in chains.values() if c.hook == hook]
