// A small Markdown renderer that builds DOM nodes and sets only textContent: model output can never
// become HTML. Covers what chat replies use: paragraphs, headings, lists, fenced code, inline code,
// **bold**, *italic* and [links](https://...) (http/https only).
"use strict";

function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = text.replace(/\r\n/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^```\s*([\w+-]*)\s*$/);
    if (fence) {
      const code = [];
      i++;
      while (i < lines.length && !/^```\s*$/.test(lines[i])) code.push(lines[i++]);
      i++; // the closing fence (or the end of a reply still streaming)
      const pre = document.createElement("pre");
      const el = document.createElement("code");
      if (fence[1]) el.dataset.lang = fence[1];
      el.textContent = code.join("\n");
      pre.appendChild(el);
      root.appendChild(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      const h = document.createElement("h" + Math.min(heading[1].length + 2, 6));
      appendInline(h, heading[2]);
      root.appendChild(h);
      i++;
      continue;
    }
    const item = /^\s*(?:[-*+]|\d+[.)])\s+/;
    if (item.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = document.createElement(ordered ? "ol" : "ul");
      while (i < lines.length && item.test(lines[i])) {
        const li = document.createElement("li");
        appendInline(li, lines[i].replace(item, ""));
        list.appendChild(li);
        i++;
      }
      root.appendChild(list);
      continue;
    }
    if (!line.trim()) { i++; continue; }
    const para = [];
    while (i < lines.length && lines[i].trim() && !/^```/.test(lines[i]) && !/^#{1,6}\s/.test(lines[i])
           && !item.test(lines[i])) para.push(lines[i++]);
    const p = document.createElement("p");
    para.forEach((l, k) => { if (k) p.appendChild(document.createElement("br")); appendInline(p, l); });
    root.appendChild(p);
  }
  return root;
}

function appendInline(parent, text) {
  const pattern = /(`[^`]+`)|(\*\*[^*]+\*\*)|(\*[^*\s][^*]*\*)|(\[[^\]]+\]\((https?:\/\/[^\s)]+)\))/g;
  let last = 0, m;
  while ((m = pattern.exec(text))) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    let el;
    if (m[1]) { el = document.createElement("code"); el.textContent = m[1].slice(1, -1); }
    else if (m[2]) { el = document.createElement("strong"); el.textContent = m[2].slice(2, -2); }
    else if (m[3]) { el = document.createElement("em"); el.textContent = m[3].slice(1, -1); }
    else {
      el = document.createElement("a");
      el.textContent = m[4].slice(1, m[4].indexOf("]("));
      el.href = m[5];
      el.rel = "noopener noreferrer";
      el.target = "_blank";
    }
    parent.appendChild(el);
    last = pattern.lastIndex;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}
