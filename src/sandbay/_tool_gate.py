"""The host's check on SDK MCP tool calls: a call that reaches the host's tool must be one
the model could have got through the CLI's permission check.

A tool the agent runs executes as the CLI's user, so it can write to the CLI's stdout, and
whatever it writes there reaches the host as the CLI's output. One such line can be a
``control_request`` of subtype ``mcp_message`` carrying a JSON-RPC ``tools/call`` for an
in-process SDK MCP server (``create_sdk_mcp_server``), which the host's SDK would run at once:
the CLI's permission check, which a model's call passes through first, never happened.

`ToolGate` sits in `SandboxTransport` between the CLI's lines and the SDK. A ``tools/call``
reaches the SDK only if one of these holds, and its tool is not named by
``disallowed_tools`` (a deny rule wins over everything, as in the CLI):

- the options allow it without asking: ``permission_mode="bypassPermissions"``, or an
  ``allowed_tools`` rule in a form the CLI honours for MCP tools (checked against the real
  CLI): ``mcp__server`` (every tool of the server), ``mcp__server__tool``, or
  ``mcp__server__`` followed by a pattern with ``*`` (``mcp__server__*``,
  ``mcp__server__get_*``). ``*`` alone, ``mcp__*`` or a rule with parentheses allow no MCP
  tool, in the CLI and here;
- the host approved this very call shortly before (`APPROVAL_TTL_S`): the SDK's answer to the
  CLI's ``can_use_tool`` request, a ``PreToolUse`` hook's ``permissionDecision: "allow"``
  (or the older ``decision: "approve"``), or a ``PermissionRequest`` hook's allow, each for
  this tool name and exactly these arguments (after any ``updatedInput``). Each approval is
  used once. And it counts only if, as for a model's call, the ``PreToolUse`` hooks came
  first: every hook callback the SDK registered for ``PreToolUse`` (learnt from its
  ``initialize`` request) whose matcher selects the tool (`hook_matches`) was asked about
  that same tool use (``tool_use_id``), tool and input, and none refused it (deny, block,
  ``continue: false``); for ``can_use_tool`` and ``PermissionRequest``, before that
  request came. A hook that failed (an error answer) did not pass;
- the host widened the CLI's rules: ``updatedPermissions`` of such an answer (``addRules``,
  ``replaceRules``, ``removeRules``, ``setMode``; only where the hooks came first, as above),
  or ``set_permission_mode`` sent by the SDK.

Anything else is answered here, as the SDK answers a call it cannot deliver (a JSON-RPC error
in a successful ``control_response``), so the CLI sees a failed tool call, and the host's tool
never runs. The gate never asks ``can_use_tool`` itself: a model's call also passes the
``PreToolUse`` hooks first, which a forged call skipped, so asking the callback alone could
give a forged call more than the model gets. A tool can forge the CLI's ``can_use_tool``
request (or a hook callback) too: then the host's callback runs on the tool's input, but its
allow counts for nothing unless the ``PreToolUse`` hooks were asked first, as above. A tool
that forges those hook requests as well gets the hooks' answers on its input, as the model's
call would.

Not seen by the gate, so not honoured for SDK MCP tools: allow rules from settings files in
the sandbox (``setting_sources``, ``settings``), flags in ``extra_args``, and the
classifier of ``permission_mode="auto"``. Give such tools in ``allowed_tools`` or approve
them in ``can_use_tool`` or a hook. Other ``mcp_message`` methods (the handshake, listing
tools) pass unchecked: ``create_sdk_mcp_server`` serves nothing else that runs host code.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

__all__ = ["APPROVAL_TTL_S", "ToolGate", "hook_matches", "mcp_tool_name", "split_rules"]

#: Seconds an approval waits for its call; the CLI calls the tool right after it asked.
APPROVAL_TTL_S = 600.0
#: Requests of the CLI awaiting the SDK's answer, and approvals awaiting their call, kept at
#: most (oldest dropped): a tool forging requests cannot make the host keep more.
MAX_PENDING = 1024
#: JSON-RPC error code of a refused call (the SDK's own code for a call it could not deliver).
REFUSED_CODE = -32603
_NOT_NAME = re.compile(r"[^A-Za-z0-9_-]")
_RULE_SPLIT = re.compile(r"[\s,]+")
# A hook matcher of these characters only is a list of tool names, not a pattern.
_NAME_LIST = re.compile(r"[A-Za-z0-9_|, -]+")


def mcp_tool_name(server: str, tool: str) -> str:
    """The name the CLI gives ``tool`` of MCP server ``server`` (``mcp__server__tool``), with
    each part normalised as the CLI does (a character other than a letter, digit, ``_`` or
    ``-`` becomes ``_``)."""
    return f"mcp__{_NOT_NAME.sub('_', server)}__{_NOT_NAME.sub('_', tool)}"


def split_rules(rules: Iterable[str]) -> list[str]:
    """Permission rules as the CLI reads ``--allowedTools``: split at commas and whitespace
    outside parentheses."""
    out: list[str] = []
    for entry in rules:
        depth, start = 0, 0
        text = str(entry)
        for i, ch in enumerate(text):
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth = max(depth - 1, 0)
            elif depth == 0 and (ch == "," or ch.isspace()):
                out.append(text[start:i])
                start = i + 1
        out.append(text[start:])
    return [rule.strip() for rule in out if rule.strip()]


def hook_matches(matcher: Any, tool_name: str) -> bool:
    """Whether a hook's ``matcher`` selects the tool ``tool_name``, as the CLI decides for
    ``PreToolUse``: ``None``, ``""`` or ``"*"`` select every tool; a matcher of letters,
    digits, ``_``, ``-``, spaces, ``|`` and ``,`` only is a list of exact names separated
    by ``|`` or ``,``; anything else is a regular expression searched anywhere in the name
    (``mcp__host__.*``, ``^mcp__``). A matcher Python cannot read as a pattern selects every
    tool (the gate then waits for that hook too, the safe side)."""
    if matcher is None or matcher == "" or matcher == "*":
        return True
    if not isinstance(matcher, str):
        return True
    if _NAME_LIST.fullmatch(matcher):
        return tool_name in [name.strip() for name in re.split(r"[|,]", matcher)]
    try:
        return re.search(matcher, tool_name) is not None
    except re.error:
        return True


def _glob(pattern: str, name: str) -> bool:
    """``*`` matches any run of characters; nothing else is special."""
    parts = [re.escape(part) for part in pattern.split("*")]
    return re.fullmatch(".*".join(parts), name, flags=re.DOTALL) is not None


def _allows(rule: str, server: str, name: str) -> bool:
    if "(" in rule:
        return False  # a rule with content allows no MCP tool
    if rule in (name, f"mcp__{server}"):
        return True
    prefix = f"mcp__{server}__"
    return "*" in rule and rule.startswith(prefix) and _glob(rule, name)


def _denies(rule: str, server: str, name: str) -> bool:
    base = rule.split("(", 1)[0]  # a deny rule with content still names the tool: refuse
    return base == f"mcp__{server}" or _glob(base, name)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class _Asked(NamedTuple):
    """A request of the CLI the SDK is to answer: ``can_use_tool`` (kind ``permission``), or
    a ``PreToolUse`` (``pre``) or ``PermissionRequest`` (``request``) hook callback."""

    kind: str
    tool_name: str
    tool_input: Any
    tool_use_id: str | None
    callback_id: str | None
    #: Why the ``PreToolUse`` hooks had not passed when a permission request came, if so.
    prior: str | None


class _Approval(NamedTuple):
    tool_name: str
    arguments: str  # canonical
    expiry: float
    tool_use_id: str | None
    asked: str  # canonical input the host was asked about
    withheld: str | None


class ToolGate:
    """Decides which SDK MCP ``tools/call`` requests of the CLI reach the host's SDK.

    Feed it every line the CLI sends (`on_cli_message`, before the SDK sees it) and every
    line the SDK writes (`on_sdk_line`). See the module's docstring for the rules.

    Args:
        allowed_tools: ``ClaudeAgentOptions.allowed_tools``.
        disallowed_tools: ``ClaudeAgentOptions.disallowed_tools``.
        permission_mode: ``ClaudeAgentOptions.permission_mode``.
        ttl_s: How long an approval stays usable (`APPROVAL_TTL_S`).
        clock: Monotonic seconds (for tests).

    Attributes:
        refused: The full names of the tools whose calls were refused, in order.
        reasons: Why each of those calls was refused, in the same order.
    """

    def __init__(
        self,
        *,
        allowed_tools: Sequence[str] = (),
        disallowed_tools: Sequence[str] = (),
        permission_mode: str | None = None,
        ttl_s: float = APPROVAL_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._allow = split_rules(allowed_tools)
        self._deny = split_rules(disallowed_tools)
        self.mode = permission_mode or "default"
        self._ttl = ttl_s
        self._clock = clock
        # request id → what the CLI asked, until the SDK answers.
        self._asked: OrderedDict[str, _Asked] = OrderedDict()
        # Each approval, oldest first.
        self._approved: list[_Approval] = []
        # Tool uses some answer refused: another hook's allow for them approves nothing.
        self._denied: OrderedDict[str, None] = OrderedDict()
        # The SDK's PreToolUse hooks (from its ``initialize``): (matcher, callback ids).
        self._pre_hooks: list[tuple[Any, tuple[str, ...]]] = []
        # tool use id → {(tool name, canonical input the hooks saw): (callback ids that
        # answered without refusing, canonical inputs those hooks updated it to)}.
        self._heard: OrderedDict[str, dict[tuple[str, str], tuple[set[str], set[str]]]] = (
            OrderedDict()
        )
        self.refused: list[str] = []
        self.reasons: list[str] = []

    @classmethod
    def for_options(cls, options: Any) -> ToolGate:
        """The gate for a run with these ``ClaudeAgentOptions``."""
        return cls(
            allowed_tools=list(options.allowed_tools or ()),
            disallowed_tools=list(options.disallowed_tools or ()),
            permission_mode=options.permission_mode,
        )

    # -- the rules -----------------------------------------------------------------------

    def check(self, server: str, tool: str, arguments: Any) -> str | None:
        """Whether a call of ``tool`` of ``server`` with ``arguments`` may run now.

        Returns:
            ``None`` if it may (using up the approval it needed, if any), else why not.
        """
        name = mcp_tool_name(server, tool)
        norm = _NOT_NAME.sub("_", server)
        if any(_denies(rule, norm, name) for rule in self._deny):
            return f"{name} is in disallowed_tools"
        if self.mode == "bypassPermissions":
            return None
        if any(_allows(rule, norm, name) for rule in self._allow):
            return None
        return self._use_approval(name, arguments)

    def approve(
        self,
        tool_name: str,
        arguments: Any,
        *,
        tool_use_id: str | None = None,
        asked_input: Any = None,
        withheld: str | None = None,
    ) -> None:
        """Note that the host approved one call of ``tool_name`` with ``arguments`` (for the
        model's tool use ``tool_use_id``, if known).

        Args:
            tool_name: The tool's full name.
            arguments: The arguments the call may have (after any ``updatedInput``).
            tool_use_id: The tool use the approval answered.
            asked_input: The input the host was asked about (``arguments`` if omitted): the
                ``PreToolUse`` hooks that select the tool must have passed this tool use
                with it (`hooks_passed`) when the call comes.
            withheld: Why the approval counts for nothing (kept to say so on refusing).
        """
        if tool_use_id is not None and tool_use_id in self._denied:
            return
        now = self._clock()
        self._approved = [a for a in self._approved if a.expiry > now][-(MAX_PENDING - 1) :]
        asked = _canonical(arguments if asked_input is None else asked_input)
        self._approved.append(
            _Approval(
                tool_name, _canonical(arguments), now + self._ttl, tool_use_id, asked, withheld
            )
        )

    def deny(self, tool_use_id: str) -> None:
        """Note that the host refused the model's tool use ``tool_use_id``: with several
        hooks, one refusal wins over another's allow, as in the CLI."""
        self._approved = [a for a in self._approved if a.tool_use_id != tool_use_id]
        self._denied[tool_use_id] = None
        while len(self._denied) > MAX_PENDING:
            self._denied.popitem(last=False)

    def hooks_passed(self, tool_use_id: str | None, tool_name: str, tool_input: Any) -> str | None:
        """Whether every ``PreToolUse`` hook of the SDK that selects ``tool_name`` was asked
        about this tool use with this input (or gave this input as its ``updatedInput``),
        and none refused it: what the CLI makes sure of before it asks permission.

        Returns:
            ``None`` if so (or no such hook exists), else why not.
        """
        wanted = {
            cid
            for matcher, ids in self._pre_hooks
            if hook_matches(matcher, tool_name)
            for cid in ids
        }
        if not wanted:
            return None
        if tool_use_id is None:
            return f"the PreToolUse hooks of {tool_name} were not asked (no tool use id)"
        if tool_use_id in self._denied:
            return f"a PreToolUse hook refused the tool use {tool_use_id}"
        canonical = _canonical(tool_input)
        missing = wanted
        for (name, seen), (ids, updated) in self._heard.get(tool_use_id, {}).items():
            if name == tool_name and canonical in (seen, *updated):
                missing = min(missing, wanted - ids, key=len)
                if not missing:
                    return None
        return (
            f"the PreToolUse hooks that select {tool_name} ({', '.join(sorted(missing))}) "
            f"were not asked about tool use {tool_use_id} with this input first, as they are "
            "for the model's call"
        )

    def _use_approval(self, name: str, arguments: Any) -> str | None:
        now, wanted = self._clock(), _canonical(arguments)
        why = (
            f"the host approved no call of {name} with these arguments (not in allowed_tools, "
            "and no can_use_tool or hook allowed it)"
        )
        for i, approval in enumerate(self._approved):
            if approval.tool_name != name or approval.arguments != wanted or approval.expiry <= now:
                continue
            withheld = approval.withheld or self.hooks_passed(
                approval.tool_use_id, name, json.loads(approval.asked)
            )
            if withheld is None:
                del self._approved[i]
                return None
            why = f"the host's approval of this call counts for nothing: {withheld}"
        return why

    def _update(self, updates: Any) -> None:
        """Apply a list of ``updatedPermissions`` (the CLI applies them too)."""
        for update in updates if isinstance(updates, list) else ():
            if not isinstance(update, Mapping):
                continue
            kind = update.get("type")
            if kind == "setMode" and isinstance(update.get("mode"), str):
                self.mode = update["mode"]
                continue
            behavior = update.get("behavior")
            if behavior not in ("allow", "deny"):
                continue
            target = self._allow if behavior == "allow" else self._deny
            rules = []
            for rule in update.get("rules") or ():
                if isinstance(rule, Mapping) and isinstance(rule.get("toolName"), str):
                    content = rule.get("ruleContent")
                    rules.append(rule["toolName"] + (f"({content})" if content else ""))
            if kind == "addRules":
                target.extend(rules)
            elif kind == "replaceRules":
                target[:] = rules
            elif kind == "removeRules":
                target[:] = [r for r in target if r not in rules]

    # -- the lines -----------------------------------------------------------------------

    def on_cli_message(self, message: Mapping[str, Any]) -> dict[str, Any] | None:
        """Look at one message of the CLI before the SDK does.

        Returns:
            ``None`` to pass it on to the SDK; else the ``control_response`` to send the CLI
            in its place (a refused ``tools/call``), which the SDK must not see.
        """
        if message.get("type") != "control_request":
            return None
        rid, request = message.get("request_id"), message.get("request")
        if not isinstance(request, Mapping):
            return None
        subtype = request.get("subtype")
        if subtype == "can_use_tool" and isinstance(rid, str):
            use = request.get("tool_use_id")
            self._note(rid, "permission", request.get("tool_name"), request.get("input"), use)
        elif subtype == "hook_callback" and isinstance(rid, str):
            data = request.get("input")
            event = data.get("hook_event_name") if isinstance(data, Mapping) else None
            if isinstance(data, Mapping) and event in ("PreToolUse", "PermissionRequest"):
                use = data.get("tool_use_id", request.get("tool_use_id"))
                kind = "pre" if event == "PreToolUse" else "request"
                callback = request.get("callback_id")
                self._note(rid, kind, data.get("tool_name"), data.get("tool_input"), use, callback)
        elif subtype == "mcp_message":
            return self._on_mcp(rid, request)
        return None

    def _note(
        self,
        rid: str,
        kind: str,
        tool_name: Any,
        tool_input: Any,
        use: Any,
        callback: Any = None,
    ) -> None:
        if not isinstance(tool_name, str):
            return
        use = use if isinstance(use, str) else None
        # The CLI asks permission only after the PreToolUse hooks passed: check they did.
        prior = None if kind == "pre" else self.hooks_passed(use, tool_name, tool_input)
        callback = callback if isinstance(callback, str) else None
        self._asked[rid] = _Asked(kind, tool_name, tool_input, use, callback, prior)
        while len(self._asked) > MAX_PENDING:
            self._asked.popitem(last=False)

    def _hear(self, asked: _Asked, answer: Mapping[str, Any]) -> None:
        """Note that a PreToolUse hook answered, without refusing, about a tool use."""
        if asked.kind != "pre" or asked.tool_use_id is None or asked.callback_id is None:
            return
        uses = self._heard.setdefault(asked.tool_use_id, {})
        self._heard.move_to_end(asked.tool_use_id)
        key = (asked.tool_name, _canonical(asked.tool_input))
        ids, updated = uses.setdefault(key, (set(), set()))
        ids.add(asked.callback_id)
        specific = answer.get("hookSpecificOutput")
        if isinstance(specific, Mapping) and isinstance(specific.get("updatedInput"), dict):
            updated.add(_canonical(specific["updatedInput"]))
        while len(self._heard) > MAX_PENDING:
            self._heard.popitem(last=False)

    def _on_mcp(self, rid: Any, request: Mapping[str, Any]) -> dict[str, Any] | None:
        rpc = request.get("message")
        if not isinstance(rpc, Mapping) or rpc.get("method") != "tools/call":
            return None
        params = rpc.get("params")
        params = params if isinstance(params, Mapping) else {}
        server, tool = request.get("server_name"), params.get("name")
        why = (
            self.check(server, tool, params.get("arguments"))
            if isinstance(server, str) and isinstance(tool, str)
            else "a tools/call without a server or tool name"
        )
        if why is None:
            return None
        self.reasons.append(why)
        self.refused.append(
            mcp_tool_name(server, tool)
            if isinstance(server, str) and isinstance(tool, str)
            else "?"
        )
        error = {"code": REFUSED_CODE, "message": f"sandbay refused the tool call: {why}"}
        return {
            "type": "control_response",
            "response": {
                "subtype": "success",
                "request_id": rid,
                "response": {
                    "mcp_response": {"jsonrpc": "2.0", "id": rpc.get("id"), "error": error}
                },
            },
        }

    def on_sdk_write(self, data: str) -> None:
        """Look at what the SDK writes to the CLI (before it goes): note the host's approvals
        and permission changes."""
        for line in data.splitlines():
            self.on_sdk_line(line)

    def on_sdk_line(self, line: str) -> None:
        """Look at one line the SDK writes to the CLI: note the host's approvals and mode."""
        if '"control_' not in line:
            return
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if message.get("type") == "control_request":
            request = message.get("request")
            if not isinstance(request, dict):
                return
            subtype = request.get("subtype")
            if subtype == "set_permission_mode" and isinstance(request.get("mode"), str):
                self.mode = request["mode"]
            elif subtype == "initialize":
                self._learn_hooks(request.get("hooks"))
            return
        response = message.get("response")
        if message.get("type") != "control_response" or not isinstance(response, dict):
            return
        rid = response.get("request_id")
        if not isinstance(rid, str):
            return
        asked = self._asked.get(rid)
        answer = response.get("response")
        if asked is None or response.get("subtype") != "success" or not isinstance(answer, dict):
            return
        use = asked.tool_use_id
        decision = _decision(answer)
        if decision is None:
            if _refuses(answer):
                del self._asked[rid]
                if use is not None:
                    self.deny(use)
            elif "mcp_response" not in answer:  # a hook without a decision
                del self._asked[rid]
                self._hear(asked, answer)
            return
        del self._asked[rid]
        self._hear(asked, answer)
        updated = decision.get("updatedInput")
        self.approve(
            asked.tool_name,
            updated if isinstance(updated, dict) else asked.tool_input,
            tool_use_id=use,
            asked_input=asked.tool_input,
            withheld=asked.prior,
        )
        # Rules the host adds for a request that skipped the hooks widen nothing either.
        if self.hooks_passed(use, asked.tool_name, asked.tool_input) is None and (
            asked.prior is None
        ):
            self._update(decision.get("updatedPermissions"))

    def _learn_hooks(self, hooks: Any) -> None:
        """Take the SDK's ``PreToolUse`` hooks from its ``initialize`` request."""
        matchers = hooks.get("PreToolUse") if isinstance(hooks, Mapping) else None
        self._pre_hooks = []
        for entry in matchers if isinstance(matchers, list) else ():
            if not isinstance(entry, Mapping):
                continue
            ids = entry.get("hookCallbackIds")
            ids = tuple(i for i in ids if isinstance(i, str)) if isinstance(ids, list) else ()
            if ids:
                self._pre_hooks.append((entry.get("matcher"), ids))


def _decision(answer: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The allow in an SDK answer (``can_use_tool``, or a hook's output), else ``None``."""
    if answer.get("behavior") == "allow":
        return answer  # can_use_tool
    specific = answer.get("hookSpecificOutput")
    if isinstance(specific, Mapping):
        event = specific.get("hookEventName")
        if event == "PreToolUse" and specific.get("permissionDecision") == "allow":
            return specific
        inner = specific.get("decision")
        if event == "PermissionRequest" and isinstance(inner, Mapping):
            return inner if inner.get("behavior") == "allow" else None
        if event == "PreToolUse" and specific.get("permissionDecision") is not None:
            return None  # deny, ask or defer
    if answer.get("decision") == "approve":
        return specific if isinstance(specific, Mapping) else {}
    return None


def _refuses(answer: Mapping[str, Any]) -> bool:
    """Whether an SDK answer refuses the tool use (``can_use_tool``'s deny, a hook's deny or
    block)."""
    if answer.get("behavior") == "deny" or answer.get("decision") == "block":
        return True
    if answer.get("continue") is False:  # stops the run: the tool does not run either
        return True
    specific = answer.get("hookSpecificOutput")
    if isinstance(specific, Mapping):
        inner = specific.get("decision")
        return specific.get("permissionDecision") == "deny" or (
            isinstance(inner, Mapping) and inner.get("behavior") == "deny"
        )
    return False
