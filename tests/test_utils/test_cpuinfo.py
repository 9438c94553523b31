"""Reading /proc/cpuinfo: exact field names, and a signature that tells CPU generations with one model name apart."""
from mmseg_cbt.utils import cpuinfo

ZEN4 = ('cpu family\t: 25\n', 'model\t\t: 17\n', 'model name\t: AMD EPYC\n', 'stepping\t: 1\n',
        'vendor_id\t: AuthenticAMD\n')
ZEN5 = ('cpu family\t: 26\n', 'model\t\t: 2\n', 'model name\t: AMD EPYC\n', 'stepping\t: 1\n',
        'vendor_id\t: AuthenticAMD\n')


def _fake(monkeypatch, lines):
    monkeypatch.setattr(cpuinfo, 'cpuinfo_lines',
                        lambda prefixes: [ln for ln in lines if ln.startswith(tuple(prefixes))])


def test_fields_match_exactly_and_signatures_differ(monkeypatch):
    _fake(monkeypatch, ZEN4)
    assert cpuinfo.cpu_model_name() == 'AMD EPYC'
    assert cpuinfo._field('model') == '17'  # not the 'model name' line
    zen4 = cpuinfo.cpu_signature()
    assert zen4 == 'AuthenticAMD 25/17/1'
    _fake(monkeypatch, ZEN5)
    assert cpuinfo.cpu_model_name() == 'AMD EPYC' and cpuinfo.cpu_signature() != zen4
    _fake(monkeypatch, ())
    assert cpuinfo.cpu_signature() == '' and cpuinfo.cpu_vendor() == ''
