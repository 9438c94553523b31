"""Installs the mmseg_cbt plugin (early-exit segmentation with class based thresholding for MMSegmentation)."""
import os.path as osp
import re
from setuptools import find_packages, setup


def parse_requirements(fname: str) -> list:
    """Reads a requirements file, skipping comments and ``-r`` includes."""
    reqs = []
    with open(osp.join(osp.dirname(__file__), fname)) as f:
        for line in f:
            line = line.split('#')[0].strip()
            if line and not line.startswith('-'):
                reqs.append(line)
    return reqs


def get_version() -> str:
    with open(osp.join(osp.dirname(__file__), 'mmseg_cbt', 'version.py')) as f:
        return re.search(r"__version__ = '([^']+)'", f.read()).group(1)


if __name__ == '__main__':
    setup(
        name='mmseg_cbt',
        version=get_version(),
        description='Early-exit semantic segmentation with class based thresholding (CBT) for MMSegmentation 1.x',
        long_description=open('README.md').read() if osp.exists('README.md') else '',
        long_description_content_type='text/markdown',
        packages=find_packages(exclude=('configs', 'tools', 'tests', 'demo')),
        include_package_data=True,
        # the compiled CPU kernel of the masked conv is built from this source on first use
        package_data={'mmseg_cbt.ops': ['csrc/*.cpp']},
        python_requires='>=3.8',
        license='Apache License 2.0',
        install_requires=parse_requirements('requirements/runtime.txt'),
        extras_require={'tests': parse_requirements('requirements/tests.txt')},
        zip_safe=False,
    )
