#!/usr/bin/env python3
"""doc-examples.py: the code blocks of the README and the man pages.

  doc-examples.py list DOC...
      Print every code block of the documents: DOC:LINE, the section it
      is in, and its first line.

  doc-examples.py plan [--subset] LIST OUTDIR DOC...
      Match the blocks against LIST (doc-examples.list) and write, for
      each document in order, OUTDIR/N.sh (the block's text) and one line
      of OUTDIR/plan:

        N <TAB> DOC:LINE <TAB> ACTION <TAB> VALUE <TAB> EXPECT <TAB> FIRST LINE

      ACTION is run (VALUE: the checks to run after it, or -; EXPECT: the
      N of the block showing what it prints, or -), skip (VALUE: the
      reason), sample (VALUE: the checks that show it is real), output
      (VALUE: the N of the block that prints it) or bad (not run: it
      breaks a rule of the examples, VALUE says which).  Exit status 1, naming
      the problem, when an entry of LIST names no block or several, or
      when a block that is to run breaks the rules of the examples (it
      uses the build tree's paths, or starts an nbdkit that listens on
      TCP): the plan is written all the same.  --subset: the documents
      are some of those LIST names (its other entries are not errors).

  doc-examples.py session SID
      The live processes of session SID but SID itself, "PID COMMAND"
      each (what the examples left running).

Code blocks: in Markdown, the fenced ``` blocks; in POD, the verbatim
paragraphs (indented lines), consecutive ones (with only blank lines
between them) making one block, wherever they are.  A LIST entry names a
block by its document's file name and one of its lines, without the
indentation: its first line, or another one when several blocks begin
alike.  Every block runs unless its entry says otherwise (see the head
of doc-examples.list).
"""
import os
import re
import shlex
import sys


class Block:
    def __init__(self, doc, line, section, lines):
        self.doc = doc
        self.line = line
        self.section = section
        # Remove the common indentation.
        indents = [len(l) - len(l.lstrip()) for l in lines if l.strip()]
        cut = min(indents) if indents else 0
        self.lines = [l[cut:] if l.strip() else "" for l in lines]
        while self.lines and not self.lines[-1]:
            self.lines.pop()
        self.first = self.lines[0].strip() if self.lines else ""

    def text(self):
        return "\n".join(self.lines) + "\n"

    def where(self):
        return "%s:%d" % (self.doc, self.line)


def markdown_blocks(path):
    doc = os.path.basename(path)
    blocks = []
    section = ""
    fence = None            # (indent, line number, lines) inside a block
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            stripped = line.lstrip()
            if fence is None:
                if stripped.startswith("```"):
                    fence = (len(line) - len(stripped), n + 1, [])
                elif line.startswith("#"):
                    section = line.lstrip("#").strip()
            elif stripped.startswith("```"):
                blocks.append(Block(doc, fence[1], section, fence[2]))
                fence = None
            else:
                # Drop the fence's indentation (a block in a list item).
                cut = min(fence[0], len(line) - len(stripped))
                fence[2].append(line[cut:])
    if fence is not None:
        sys.exit("%s:%d: unterminated ``` block" % (doc, fence[1] - 1))
    return blocks


def pod_blocks(path):
    """Verbatim paragraphs, outside =begin/=end and =for."""
    doc = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Paragraphs: (first line number, lines).
    paras, cur, start = [], [], 0
    for n, line in enumerate(lines, 1):
        if line.strip() == "":
            if cur:
                paras.append((start, cur))
                cur = []
        else:
            if not cur:
                start = n
            cur.append(line)
    if cur:
        paras.append((start, cur))

    blocks = []
    head1 = head2 = ""
    in_begin = None
    pending = None          # (line, section, lines) of the current block
    for start, para in paras:
        first = para[0]
        if in_begin is not None:
            if re.match(r"=end\s+" + re.escape(in_begin) + r"\b", first):
                in_begin = None
            continue
        if first[:1] in (" ", "\t"):
            sect = head1 + (" / " + head2 if head2 else "")
            if pending is None:
                pending = (start, sect, list(para))
            else:
                # Another verbatim paragraph of the same block: keep the
                # blank lines between them.
                gap = start - (pending[0] + len(pending[2]))
                pending[2].extend([""] * gap + para)
            continue
        if pending is not None:
            blocks.append(Block(doc, pending[0], pending[1], pending[2]))
            pending = None
        m = re.match(r"=(\w+)\s*(.*)", first)
        if m:
            cmd, arg = m.group(1), m.group(2).strip()
            if cmd == "head1":
                head1, head2 = arg, ""
            elif cmd in ("head2", "head3", "head4"):
                head2 = arg
            elif cmd == "begin":
                in_begin = arg.split()[0] if arg else ""
    if pending is not None:
        blocks.append(Block(doc, pending[0], pending[1], pending[2]))
    return blocks


def blocks_of(path):
    if path.endswith(".md"):
        return markdown_blocks(path)
    if path.endswith(".pod"):
        return pod_blocks(path)
    sys.exit("%s: neither Markdown (.md) nor POD (.pod)" % path)


def read_list(path):
    """Entries of LIST: {(doc, a line of the block): {kind: value,
    "line": N}}."""
    entries = {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    key = None

    def close(key):
        if key is None:
            return
        doc, first, n, kinds = key
        if not kinds:
            sys.exit("%s:%d: '[%s] %s' has no skip:, check:, prints: or "
                     "sample: line" % (path, n, doc, first))
        if "skip" in kinds and len(kinds) > 1:
            sys.exit("%s:%d: [%s] %s: skip: goes alone" % (path, n, doc,
                                                          first))
        if "sample" in kinds and len(kinds) > 1:
            sys.exit("%s:%d: [%s] %s: sample: goes alone" % (path, n, doc,
                                                            first))
        if (doc, first) in entries:
            sys.exit("%s:%d: [%s] %s is listed twice" % (path, n, doc,
                                                        first))
        kinds["line"] = n
        entries[(doc, first)] = kinds

    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.match(r"\[([^]]+)\] (.+)$", line)
        if m:
            close(key)
            key = (m.group(1), m.group(2).strip(), n, {})
            continue
        m = re.match(r"(skip|check|prints|sample): *(.*)$", line)
        if not m or key is None:
            sys.exit("%s:%d: expected '[DOC] FIRST LINE' followed by "
                     "'skip: REASON', 'check: NAME...', 'prints: next' or "
                     "'sample: NAME...': %r" % (path, n, line))
        kind, value = m.group(1), m.group(2).strip()
        if not value:
            sys.exit("%s:%d: %s: needs %s" % (path, n, kind,
                     "a reason" if kind == "skip" else "a value"))
        if kind == "prints" and value != "next":
            sys.exit("%s:%d: prints: only 'next' (the next block is what "
                     "this one prints) is known, not %r" % (path, n, value))
        if kind in key[3]:
            sys.exit("%s:%d: a second %s: line" % (path, n, kind))
        key[3][kind] = value
    close(key)
    return entries


def logical_lines(text):
    """The block's lines with backslash continuations joined."""
    out, cur = [], ""
    for line in text.split("\n"):
        if line.endswith("\\"):
            cur += line[:-1] + " "
        else:
            out.append(cur + line)
            cur = ""
    if cur:
        out.append(cur)
    return out


def lint(block):
    """Problems of a block that is to run, as a list of messages."""
    problems = []
    text = block.text()
    if re.search(r"(^|[\s'\"=(])\./nbdkit\b", text) or "_build" in text:
        problems.append("uses the build tree's paths (./nbdkit, _build/): "
                        "examples read as after make install (the tests "
                        "and the README's 'Running uninstalled' put the "
                        "build first on PATH)")
    for ll in logical_lines(text):
        if ll.lstrip().startswith("#"):
            continue
        try:
            words = shlex.split(ll, comments=True)
        except ValueError:
            continue            # quoting across lines: not checked
        depth = 0
        command_start = True
        for i, w in enumerate(words):
            if w == "[":
                depth += 1
            elif w == "]":
                depth -= 1
            if (command_start and depth == 0 and
                    (w == "nbdkit" or w.endswith("/nbdkit"))):
                rest = []
                for v in words[i + 1:]:
                    if v in ("|", "||", "&&", ";", "&"):
                        break
                    rest.append(v)
                listens = not any(
                    v in ("-U", "--unix", "-s", "--single", "--dump-plugin",
                          "--help", "--version", "--dump-config")
                    or v.startswith("--unix=") or v.startswith("-U")
                    for v in rest)
                if listens:
                    problems.append("'%s' listens on TCP port 10809 on "
                                    "every interface: use -U SOCKET or "
                                    "-U - with --run" % ll.strip())
            command_start = w in ("|", "||", "&&", ";", "&", "then", "do",
                                  "else", "!", "time", "timeout") or \
                (command_start and (re.match(r"^\w+=", w) is not None or
                                    re.match(r"^-", w) is not None or
                                    re.match(r"^\d+$", w) is not None))
    return problems


def main(argv):
    if len(argv) >= 2 and argv[0] == "list":
        for path in argv[1:]:
            for b in blocks_of(path):
                print("%s\t[%s]\t%s" % (b.where(), b.section, b.first))
        return 0
    subset = argv[1:2] == ["--subset"]
    if subset:
        argv = argv[:1] + argv[2:]
    if len(argv) < 4 or argv[0] != "plan":
        sys.exit(__doc__)
    listfile, outdir, docs = argv[1], argv[2], argv[3:]
    lname = os.path.basename(listfile)
    entries = read_list(listfile)
    used = set()
    errors = []
    n = 0
    plan = []
    for path in docs:
        doc = os.path.basename(path)
        blocks = blocks_of(path)
        # Each entry names the one block that has its line.
        entry_of = {}
        for (edoc, key), entry in entries.items():
            if edoc != doc:
                continue
            found = [b for b in blocks
                     if key in (l.strip() for l in b.lines)]
            if found:
                used.add((edoc, key))
            if len(found) > 1:
                errors.append(
                    "%s:%d: [%s] %s: %d blocks have this line (lines %s): "
                    "name the block by a line only it has"
                    % (lname, entry["line"], doc, key, len(found),
                       ", ".join(str(x.line) for x in found)))
                continue
            for b in found:
                if id(b) in entry_of:
                    errors.append("%s: named by two entries of %s"
                                  % (b.where(), lname))
                entry_of[id(b)] = entry
        output_of = None        # the block whose output this one is
        for i, b in enumerate(blocks):
            n += 1
            entry = entry_of.get(id(b))
            entry = entry or {}
            expect = "-"
            if output_of is not None:
                action, value = "output", str(output_of)
                if entry:
                    errors.append("%s: the output of the block before it "
                                  "(prints: next), also listed in %s"
                                  % (b.where(), lname))
                output_of = None
            elif "skip" in entry:
                action, value = "skip", entry["skip"]
            elif "sample" in entry:
                action, value = "sample", entry["sample"]
            else:
                action, value = "run", entry.get("check", "")
                if "prints" in entry:
                    if i + 1 >= len(blocks):
                        errors.append("%s: prints: next, but no block "
                                      "follows" % b.where())
                    else:
                        expect = str(n + 1)
                        output_of = n
                problems = lint(b)
                for p in problems:
                    errors.append("%s: %s (not listed as skip: in %s)"
                                  % (b.where(), p, lname))
                if problems:
                    # Not run: it could clash with other servers.
                    action, value, expect = "bad", problems[0], "-"
            with open(os.path.join(outdir, "%d.sh" % n), "w",
                      encoding="utf-8") as f:
                f.write(b.text())
            plan.append("\t".join((str(n), b.where(), action, value or "-",
                                   expect, b.first)))
    docnames = {os.path.basename(p) for p in docs}
    for (doc, first), entry in sorted(entries.items()):
        if doc not in docnames and not subset:
            errors.append("%s:%d: [%s]: not a document of the test"
                          % (lname, entry["line"], doc))
        elif doc in docnames and (doc, first) not in used:
            errors.append("%s:%d: [%s] %s: no block of %s has this line "
                          "(any more?): update or remove the entry"
                          % (lname, entry["line"], doc, first, doc))
    with open(os.path.join(outdir, "plan"), "w", encoding="utf-8") as f:
        f.write("".join(p + "\n" for p in plan))
    for e in errors:
        print("doc-examples: " + e, file=sys.stderr)
    return 1 if errors else 0


def session(sid):
    """Live processes of session SID other than SID: 'PID COMMAND'."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == sid:
            continue
        try:
            with open("/proc/%s/stat" % pid) as f:
                stat = f.read()
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...: comm may hold spaces.
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and fields[3] == sid:
            out.append("%s %s" % (pid, cmd.strip()))
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["session"] and len(sys.argv) == 3:
        print("".join(l + "\n" for l in session(sys.argv[2])), end="")
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
